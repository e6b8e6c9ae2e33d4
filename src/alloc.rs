//! The binary's global allocator: mimalloc (or the system allocator with `LOWTIDE_ALLOC=system`,
//! for comparisons), wrapped by [`MappedAlloc`] so that mapped weights can be freed.
//!
//! Why mimalloc: candle allocates a fresh buffer for every op's output, many of them tens to
//! hundreds of MiB (a bf16 weight converted to f32, an activation). glibc serves anything over
//! 32 MiB with mmap and returns it with munmap, so each such op pays page faults and the kernel's
//! page zeroing again. mimalloc keeps freed memory committed for a delay (raised here to
//! 10 s, `LOWTIDE_PURGE_MS` to change it) and hands it to the next allocation of that size,
//! which in a layer loop comes milliseconds later and in a denoising loop a step later: with
//! 1 s, the SD1.5 UNet step (1.6 s on 2 cores) found last step's buffers returned and faulted
//! them in again — 3–4% of the step and a fifth of the system time (measured interleaved).
//! Memory is handed back at phase ends with [`release_free_memory`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use mimalloc::MiMalloc;

use crate::weights::mapped::MappedAlloc;

/// The allocator the `lowtide` binary installs.
pub type LowtideAlloc = MappedAlloc<Inner>;

/// `LowtideAlloc` as a constant, for `#[global_allocator]`.
pub const fn lowtide_alloc() -> LowtideAlloc {
    MappedAlloc(Inner)
}

/// mimalloc or the system allocator, chosen once at the first allocation.
pub struct Inner;

const UNSET: u8 = 0;
const MI: u8 = 1;
const SYSTEM: u8 = 2;
static CHOICE: AtomicU8 = AtomicU8::new(UNSET);

/// mimalloc's `mi_option_purge_delay` (v3 header): milliseconds before freed memory is returned.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[inline]
fn choice() -> u8 {
    match CHOICE.load(Relaxed) {
        UNSET => {
            // getenv does not allocate; the first allocation happens before main, on one thread.
            // SAFETY: a NUL-terminated name; the result is only read.
            let system = unsafe {
                let v = libc::getenv(c"LOWTIDE_ALLOC".as_ptr());
                !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == b"system"
            };
            let c = if system { SYSTEM } else { MI };
            if c == MI {
                // SAFETY: sets a plain option before mimalloc's first allocation.
                unsafe {
                    let v = libc::getenv(c"LOWTIDE_PURGE_MS".as_ptr());
                    let ms = if v.is_null() {
                        10_000
                    } else {
                        libc::atol(v) as std::ffi::c_long
                    };
                    libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms)
                };
            }
            match CHOICE.compare_exchange(UNSET, c, Relaxed, Relaxed) {
                Ok(_) => c,
                Err(other) => other,
            }
        }
        c => c,
    }
}

// SAFETY: every pointer goes back to the allocator that made it: the choice never changes once
// made.
unsafe impl GlobalAlloc for Inner {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if choice() == MI {
            MiMalloc.alloc(layout)
        } else {
            System.alloc(layout)
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if choice() == MI {
            MiMalloc.alloc_zeroed(layout)
        } else {
            System.alloc_zeroed(layout)
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if choice() == MI {
            MiMalloc.dealloc(ptr, layout)
        } else {
            System.dealloc(ptr, layout)
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if choice() == MI {
            MiMalloc.realloc(ptr, layout, new_size)
        } else {
            System.realloc(ptr, layout, new_size)
        }
    }
}

/// Hands the memory mimalloc holds freed but committed (up to the purge delay above) back to the
/// OS now: for the points where one phase's buffers are all dropped and the next phase allocates
/// buffers of other sizes (a tiled decode moving to a tile of another size), which would
/// otherwise come on top of the lingering ones. A no-op with the system allocator, or where
/// lowtide is used as a library under another allocator (mimalloc then holds nothing).
pub fn release_free_memory() {
    if CHOICE.load(Relaxed) == MI {
        // SAFETY: a plain call into mimalloc, valid at any time.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}
