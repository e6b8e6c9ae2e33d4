//! lowtide: run diffusers-format diffusion models in small memory.
//!
//! Data flows one way: files ([`weights`]) → parameter handles resolved by the residency manager
//! ([`residency`]) → layers and models ([`layers`], [`models`]) → [`schedulers`] and
//! [`pipelines`] → images ([`io`]).

pub mod alloc;
pub mod device;
pub mod error;
pub mod io;
pub mod layers;
pub mod models;
pub mod pipelines;
pub mod planner;
pub mod plot;
pub mod profile;
pub mod residency;
pub mod rng;
pub mod schedulers;
pub mod tokenizer;
pub mod validate;
pub mod video;
pub mod weights;

pub use error::{Error, Result};
