//! The `lowtide` command line: argument parsing, progress and error reporting over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use lowtide::device::{parse_device, parse_dtype};
use lowtide::io::{
    read_image, read_image_arg, read_single_tensor, save_images, save_tensors, write_atomic,
    TensorFileWriter,
};
use lowtide::layers::MatmulPrecision;
use lowtide::models::VaeOptions;
use lowtide::pipelines::planning::{apply_plan, plan_run, Budget, PlanOptions};
use lowtide::pipelines::{
    decode_or_retry_tiled, load_any_vae, resolve_model, AnyVae, DeviceMapSpec, GenerateRequest,
    LoadOptions, OffloadPlan,
};
use lowtide::residency::accounting::Timeline;
use lowtide::residency::device_map::{parse_bytes, parse_max_memory};
use lowtide::residency::manager::Resident;
use lowtide::residency::{DeviceMap, PinMemory, StoragePlan, Strategy};
use lowtide::validate::{arg_f32, output_path};

use lowtide::schedulers::SchedulerKind;

const MIB: f64 = 1024.0 * 1024.0;

/// mimalloc, and large weights backed by the checkpoint's pages instead of copies (see
/// `lowtide::alloc` and `weights::mapped`).
#[global_allocator]
static ALLOC: lowtide::alloc::LowtideAlloc = lowtide::alloc::lowtide_alloc();

#[derive(Parser)]
#[command(
    name = "lowtide",
    version,
    about = "Run diffusers-format diffusion models in small memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (txt2img), or from an init image (img2img).
    Generate(Box<GenerateArgs>),
    /// Print the plan `generate --memory-budget` would run (per component and phase, predicted
    /// peaks and time, the runners-up), without loading weights. Same arguments as `generate`.
    Plan {
        #[command(flatten)]
        args: Box<GenerateArgs>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draw a saved `--report` as a picture of memory over time.
    Plot {
        /// A report written by `generate --report FILE.json`.
        report: PathBuf,
        /// The picture: .svg or .png.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Write a component's weights as a GGUF file (quantized), from a diffusers pipeline
    /// folder or from a single file (--weights).
    Quantize {
        /// A diffusers pipeline folder (or cached repo id): the component's config and class.
        #[arg(long)]
        model: String,
        /// The component to write, e.g. transformer.
        #[arg(long, default_value = "transformer")]
        component: String,
        /// Read the weights from this file instead (GGUF, safetensors in any layout --weights
        /// reads).
        #[arg(long, value_name = "FILE")]
        weights: Option<PathBuf>,
        /// Weight file variant of the folder's checkpoint, e.g. fp16.
        #[arg(long)]
        variant: Option<String>,
        /// q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, f16, bf16 or f32.
        #[arg(long = "type", value_name = "TYPE")]
        qtype: String,
        /// The .gguf file to write.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Run the pipeline's VAE alone.
    Vae {
        #[command(subcommand)]
        command: Box<VaeCommand>,
    },
}

#[derive(Subcommand)]
enum VaeCommand {
    /// Decode latents z (as given, no scaling) into images.
    Decode {
        #[command(flatten)]
        model: ModelArgs,
        /// safetensors file with one tensor (B, C, h, w).
        #[arg(long)]
        latents: PathBuf,
        /// Writes `sample` (B, 3, H, W), unclamped.
        #[arg(long)]
        save_tensors: PathBuf,
        /// Also write PNG images (out.png, or out-0.png, out-1.png… for a batch).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        vae: VaeArgs,
    },
    /// Encode an image into the latent distribution.
    Encode {
        #[command(flatten)]
        model: ModelArgs,
        /// A PNG, or a safetensors file with one tensor (B, 3, H, W) in [-1, 1].
        #[arg(long)]
        image: PathBuf,
        /// Writes `mean` and `logvar`.
        #[arg(long)]
        save_tensors: PathBuf,
        #[command(flatten)]
        vae: VaeArgs,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A diffusers pipeline folder, or a Hugging Face repo id found in the local cache; or one
    /// original checkpoint file holding the whole pipeline (with --config).
    #[arg(long)]
    model: String,
    /// With a single-file --model: the diffusers pipeline (folder or cached repo id) whose
    /// model_index, configs, scheduler and tokenizers go with it, as diffusers'
    /// `from_single_file(path, config=...)`.
    #[arg(long, value_name = "DIR|REPO_ID")]
    config: Option<String>,
    /// Weight file variant, e.g. `fp16` for `*.fp16.safetensors`.
    #[arg(long)]
    variant: Option<String>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Execution device: cpu, cuda or cuda:N (default: the best available).
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32 matrix products: `highest` (plain f32, the default) or `high` (bf16x3 on CPUs with
    /// AMX: about 2x faster linears, ~2^-17 relative error per product; as PyTorch's
    /// `set_float32_matmul_precision`). Unset, LOWTIDE_MATMUL_PRECISION decides.
    #[arg(long, value_parser = ["highest", "high"])]
    matmul_precision: Option<String>,
}

impl ModelArgs {
    fn open(&self) -> Result<(PathBuf, LoadOptions)> {
        match self.matmul_precision.as_deref() {
            Some("high") => lowtide::layers::set_matmul_precision(MatmulPrecision::High),
            Some(_) => lowtide::layers::set_matmul_precision(MatmulPrecision::Highest),
            None => {}
        }
        let device = parse_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype)?;
        if device.is_cpu() && dtype != candle_core::DType::F32 {
            anyhow::bail!(
                "--dtype {}: CPU compute supports f32 only (f16/bf16 weights are converted to \
                 f32 as they are read; drop --dtype, or use --device cuda)",
                self.dtype
            );
        }
        let file = Path::new(&self.model);
        let (pipeline, whole_file) = match (&self.config, file.is_file()) {
            (Some(c), true) => (c.as_str(), Some(file.to_path_buf())),
            (None, true) => anyhow::bail!(
                "--model {} is a single file: give the pipeline it belongs to with --config \
                 DIR|REPO_ID (its configs and tokenizers), e.g. --config \
                 stable-diffusion-v1-5/stable-diffusion-v1-5",
                self.model
            ),
            (Some(_), false) => anyhow::bail!(
                "--config goes with a single-file --model; {} is not a file",
                self.model
            ),
            (None, false) => (self.model.as_str(), None),
        };
        let root = resolve_model(pipeline, self.variant.as_deref())
            .with_context(|| format!("cannot find model `{pipeline}`"))?;
        let opts = LoadOptions {
            device,
            dtype,
            variant: self.variant.clone(),
            whole_file,
            ..LoadOptions::default()
        };
        Ok((root, opts))
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps (default: the pipeline's, 50 for SD, 28 for FLUX).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale: classifier-free for SD (off at 1 or below), embedded for FLUX dev
    /// (default: 7.5 for SD, 3.5 for FLUX).
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f64>,
    /// FLUX: true classifier-free guidance scale with --negative-prompt (diffusers'
    /// true_cfg_scale).
    #[arg(long, allow_negative_numbers = true)]
    true_cfg: Option<f64>,
    /// FLUX: T5 tokens, at most 512 (default 512; schnell checkpoints are used with 256).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Dtype resident weights are kept in, upcast per layer at forward time: auto (as in the
    /// file), f32, bf16, f16, f8e4m3 or f8e5m2 for the denoiser, or COMPONENT=DTYPE,...
    #[arg(long, value_name = "DTYPE")]
    storage_dtype: Option<String>,
    /// A component's weights from one file instead of the pipeline folder (repeatable):
    /// `transformer=flux1-dev-Q4_K_S.gguf`. GGUF, or safetensors with diffusers, original
    /// (BFL, Wan) or ComfyUI keys, fp8_scaled included; config and tokenizers come from --model.
    #[arg(long, value_name = "COMPONENT=FILE")]
    weights: Vec<String>,
    /// SD: pndm, ddim, euler, euler-a or dpmpp-2m (default: the pipeline's own).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// img2img: the image to start from.
    #[arg(long, requires = "strength")]
    init_image: Option<PathBuf>,
    /// img2img: how much of the schedule to run, in (0, 1].
    #[arg(long, requires = "init_image", allow_negative_numbers = true)]
    strength: Option<f64>,
    /// safetensors file with one tensor (B, C, h, w): the initial latents.
    #[arg(long, conflicts_with = "init_image")]
    latents: Option<PathBuf>,
    /// Images: a .png (out-0.png, out-1.png, … for several). Videos: a .mp4 (H.264), or a
    /// folder for numbered PNG frames. Default: out.png, or out.mp4 for video pipelines.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Video: frames to generate (4k + 1; others are rounded as diffusers does; default 81).
    #[arg(long)]
    frames: Option<usize>,
    /// Video: frames per second of the .mp4 (default 16).
    #[arg(long, default_value_t = 16)]
    fps: u32,
    /// Wan 2.2 A14B: guidance of the low-noise expert (default: --guidance).
    #[arg(long, allow_negative_numbers = true)]
    guidance_2: Option<f64>,
    /// Writes `prompt_embeds`, `final_latents` and `image` as f32 safetensors.
    #[arg(long)]
    save_tensors: Option<PathBuf>,
    #[command(flatten)]
    memory: MemoryArgs,
    #[command(flatten)]
    vae: VaeArgs,
}

#[derive(Args)]
struct VaeArgs {
    /// Decode/encode in overlapping tiles (diffusers' enable_tiling).
    #[arg(long)]
    tiling: bool,
    /// Tile size in image pixels (a multiple of the VAE factor); implies --tiling.
    #[arg(long, value_name = "PX")]
    tile_size: Option<usize>,
    /// Tile overlap factor in [0, 1) (default 0.25); implies --tiling.
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    tile_overlap: Option<f64>,
    /// One batch item at a time (diffusers' enable_slicing).
    #[arg(long)]
    slicing: bool,
    /// Video VAE: latent frames per causal decode chunk after the first (diffusers decodes 1;
    /// more means fewer passes and more memory, equal results).
    #[arg(long, value_name = "N")]
    decode_chunk_size: Option<usize>,
    /// generate/plan: the memory the whole run may use (the process's RAM on the CPU; on a GPU
    /// its memory, or cuda=SIZE,cpu=SIZE); lowtide plans the fastest run that fits. vae
    /// decode/encode: turn tiling on, with the largest tile that fits, when the untiled
    /// decode would exceed it. Without it nothing changes behind your back.
    #[arg(long, value_name = "BYTES")]
    memory_budget: Option<String>,
    /// With --memory-budget: the planner may choose VAE tiling (not bit-identical to an untiled
    /// decode) when it is faster or the only way to fit.
    #[arg(long)]
    allow_lossy: bool,
    /// With --memory-budget: what the process holds before loading any weight (default:
    /// measured, plus the run's thread overhead). For programs that hold more, and for tests.
    #[arg(long, value_name = "SIZE", hide = true)]
    plan_baseline: Option<String>,
}

impl VaeArgs {
    fn options_unbudgeted(&self) -> VaeOptions {
        VaeOptions {
            tiling: self.tiling,
            tile_size: self.tile_size,
            tile_overlap: self.tile_overlap,
            slicing: self.slicing,
            memory_budget: None,
        }
    }

    fn options(&self) -> Result<VaeOptions> {
        Ok(VaeOptions {
            tiling: self.tiling,
            tile_size: self.tile_size,
            tile_overlap: self.tile_overlap,
            slicing: self.slicing,
            memory_budget: self
                .memory_budget
                .as_deref()
                .map(parse_bytes)
                .transpose()
                .context("--memory-budget")?,
        })
    }

    /// generate's whole-run budget.
    fn budget(&self) -> Result<Option<Budget>> {
        self.memory_budget
            .as_deref()
            .map(Budget::parse)
            .transpose()
            .context("--memory-budget")
    }
}

#[derive(Args)]
struct MemoryArgs {
    /// Offload strategy: none (the default), model, sequential or group. With --memory-budget,
    /// a strategy given here is kept and planned around.
    #[arg(long)]
    offload: Option<String>,
    /// Keep this component resident (text_encoder, unet, vae); repeatable.
    #[arg(long = "keep-on-device", value_name = "COMPONENT")]
    keep_on_device: Vec<String>,
    /// Group offload: consecutive units (resnets, attention blocks, …) per group.
    #[arg(long, default_value_t = 1)]
    blocks_per_group: usize,
    /// Group offload: do not prefetch the next group.
    #[arg(long)]
    no_prefetch: bool,
    /// Group offload: keep the K largest groups resident for the whole run and stream the
    /// others (partial residency).
    #[arg(long, value_name = "K", conflicts_with = "resident_bytes")]
    resident_groups: Option<usize>,
    /// Group offload: keep the largest groups resident, up to SIZE (e.g. 2GiB), per component.
    #[arg(long, value_name = "SIZE")]
    resident_bytes: Option<String>,
    /// Draw resident memory over the run (per component, total, process RSS, phases, budget,
    /// transfers and stalls) into FILE.svg or FILE.png.
    #[arg(long, value_name = "FILE")]
    report_plot: Option<PathBuf>,
    /// With --device cuda and offloading: pinned host copies of the offloaded weights, up to
    /// `auto` (half the available host memory), `off` or a size such as 16GiB.
    #[arg(long, default_value = "auto")]
    pin_memory: String,
    /// Place whole components on devices: `balanced` (with --max-memory) or COMPONENT=DEVICE,...
    #[arg(long)]
    device_map: Option<String>,
    /// Budgets for --device-map balanced, e.g. cuda:0=6GiB,cuda:1=6GiB,cpu=16GiB.
    #[arg(long)]
    max_memory: Option<String>,
    /// Write residency figures (peak resident bytes, transfers, times) as JSON.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
}

impl MemoryArgs {
    /// Partial residency from `--resident-groups`/`--resident-bytes`.
    fn resident(&self) -> Result<Option<Resident>> {
        Ok(match (self.resident_groups, &self.resident_bytes) {
            (Some(k), _) => Some(Resident::Groups(k)),
            (None, Some(b)) => Some(Resident::Bytes(parse_bytes(b).context("--resident-bytes")?)),
            (None, None) => None,
        })
    }

    /// The strategy given (`None` when `--offload` was not), checked against the flags that
    /// only mean something with it. With a budget (`planned`), `--keep-on-device` needs no
    /// `--offload`: it fixes that component resident and the planner places the rest.
    fn strategy(&self, planned: bool) -> Result<Option<Strategy>> {
        let offload = self.offload.as_deref();
        let group = offload == Some("group");
        let resident = self.resident_groups.is_some() || self.resident_bytes.is_some();
        if !group && (self.blocks_per_group != 1 || self.no_prefetch || resident) {
            anyhow::bail!(
                "--blocks-per-group, --no-prefetch, --resident-groups and --resident-bytes apply                  to --offload group only (got --offload {})",
                offload.unwrap_or("none")
            );
        }
        if !planned && offload.unwrap_or("none") == "none" && !self.keep_on_device.is_empty() {
            anyhow::bail!(
                "--keep-on-device keeps a component out of offloading; it needs --offload model, sequential or group"
            );
        }
        let Some(offload) = offload else {
            return Ok(None);
        };
        Ok(Some(match offload {
            "none" => Strategy::None,
            "model" => Strategy::Model,
            "sequential" => Strategy::Sequential,
            "group" => {
                if self.blocks_per_group == 0 {
                    anyhow::bail!("--blocks-per-group must be at least 1");
                }
                Strategy::Group {
                    blocks_per_group: self.blocks_per_group,
                    prefetch: !self.no_prefetch,
                }
            }
            other => anyhow::bail!(
                "unknown --offload strategy `{other}`; choose none, model, sequential or group"
            ),
        }))
    }

    fn device_map(&self) -> Result<Option<DeviceMapSpec>> {
        match (self.device_map.as_deref(), &self.max_memory) {
            (None, None) => Ok(None),
            (None, Some(_)) => anyhow::bail!("--max-memory needs --device-map balanced"),
            (Some("balanced"), mm) => {
                let mm = mm.as_deref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--device-map balanced needs --max-memory, e.g. cuda:0=6GiB,cpu=16GiB"
                    )
                })?;
                Ok(Some(DeviceMapSpec::Balanced {
                    max_memory: parse_max_memory(mm)?,
                }))
            }
            (Some(spec), None) => Ok(Some(DeviceMapSpec::Explicit(DeviceMap::parse_explicit(
                spec,
            )?))),
            (Some(_), Some(_)) => {
                anyhow::bail!("--max-memory only applies to --device-map balanced")
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lowtide::weights::mapped::explain_bus_errors();
    let result = match cli.command {
        Command::Generate(args) => generate(*args, None),
        Command::Plan { args, json } => generate(*args, Some(json)),
        Command::Plot { report, out } => plot(&report, &out),
        Command::Vae { command } => vae(*command),
        Command::Quantize {
            model,
            component,
            weights,
            variant,
            qtype,
            out,
        } => quantize(
            &model,
            &component,
            weights.as_deref(),
            variant.as_deref(),
            &qtype,
            &out,
        ),
    };
    eprint!("{}", lowtide::profile::report());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lowtide quantize`: one component to a GGUF file.
fn quantize(
    model: &str,
    component: &str,
    weights: Option<&Path>,
    variant: Option<&str>,
    qtype: &str,
    out: &Path,
) -> Result<()> {
    let target = lowtide::weights::ggml::parse(qtype)?;
    output_path("--out", out, &["gguf"])?;
    let root =
        resolve_model(model, variant).with_context(|| format!("cannot find model `{model}`"))?;
    let (store, class) =
        lowtide::pipelines::loader::open_component_store(&root, component, variant, weights)
            .with_context(|| format!("cannot open the weights of `{component}`"))?;
    let arch = lowtide::weights::quantize::architecture(&class);
    let bar = indicatif::ProgressBar::new(0);
    let t0 = std::time::Instant::now();
    let s = lowtide::weights::quantize::write_gguf(&store, target, arch, out, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })
    .with_context(|| format!("cannot write {}", out.display()))?;
    bar.finish_and_clear();
    let types: Vec<String> = s
        .per_type
        .iter()
        .map(|(t, (n, b))| format!("{t}: {n} tensors, {:.1} MiB", *b as f64 / 1048576.0))
        .collect();
    eprintln!(
        "wrote {} ({} tensors, {:.1} MiB, architecture `{arch}`) in {:.1} s: {}",
        out.display(),
        s.tensors,
        s.bytes as f64 / 1048576.0,
        t0.elapsed().as_secs_f64(),
        types.join("; ")
    );
    Ok(())
}

/// `--weights COMPONENT=FILE` pairs; every file must exist and no component be named twice.
fn parse_weights(pairs: &[String]) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut out = std::collections::BTreeMap::new();
    for p in pairs {
        let Some((c, f)) = p.split_once('=') else {
            anyhow::bail!("--weights {p}: expected COMPONENT=FILE, e.g. transformer=model.gguf");
        };
        let (c, f) = (c.trim(), PathBuf::from(f.trim()));
        if !f.is_file() {
            anyhow::bail!("--weights {p}: {} is not a file", f.display());
        }
        if out.insert(c.to_string(), f).is_some() {
            anyhow::bail!("--weights names `{c}` twice");
        }
    }
    Ok(out)
}

/// Runs `generate`, or with `plan_only` (`Some(json)`) prints its plan and stops before loading
/// any weight.
fn generate(args: GenerateArgs, plan_only: Option<bool>) -> Result<()> {
    // Check cheap arguments and every output path before loading gigabytes.
    let pipeline = args.model.config.as_deref().unwrap_or(&args.model.model);
    let video = model_class(pipeline).is_some_and(|c| lowtide::pipelines::makes_video(&c));
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(if video { "out.mp4" } else { "out.png" }));
    if video {
        lowtide::video::video_output_path("--out", &out_path, args.frames.unwrap_or(81))?;
        lowtide::video::check_fps("--fps", args.fps)?;
    } else {
        output_path("--out", &out_path, &["png"])?;
        for (set, flag) in [
            (args.frames.is_some(), "--frames"),
            (args.vae.decode_chunk_size.is_some(), "--decode-chunk-size"),
        ] {
            if set {
                anyhow::bail!("{flag} applies to video pipelines only");
            }
        }
    }
    if args.vae.decode_chunk_size == Some(0) {
        anyhow::bail!("--decode-chunk-size must be at least 1 latent frame");
    }
    if let Some(p) = &args.save_tensors {
        output_path("--save-tensors", p, &["safetensors"])?;
    }
    if let Some(p) = &args.memory.report {
        output_path("--report", p, &["json"])?;
    }
    if let Some(p) = &args.memory.report_plot {
        output_path("--report-plot", p, &["svg", "png"])?;
    }
    let budget = args.vae.budget()?;
    if args.vae.allow_lossy && budget.is_none() {
        anyhow::bail!(
            "--allow-lossy lets --memory-budget choose VAE tiling; it needs --memory-budget"
        );
    }
    if plan_only.is_some() && budget.is_none() {
        anyhow::bail!("lowtide plan needs --memory-budget SIZE (the memory the run may use)");
    }
    if let Some(g) = args.guidance {
        arg_f32("--guidance", g)?;
    }
    let storage = args
        .storage_dtype
        .as_deref()
        .map(StoragePlan::parse)
        .transpose()?
        .unwrap_or_default();
    let scheduler = args
        .scheduler
        .as_deref()
        .map(SchedulerKind::from_cli)
        .transpose()?;
    if args.steps == Some(0) {
        anyhow::bail!("--steps must be at least 1");
    }
    if let Some(s) = args.strength {
        if !(s > 0.0 && s <= 1.0) {
            anyhow::bail!("--strength must be in (0, 1]; got {s}");
        }
    }
    let given = args.memory.strategy(budget.is_some())?;
    let strategy = given.unwrap_or(Strategy::None);
    let resident = args.memory.resident()?;
    let device_map = args.memory.device_map()?;
    if device_map.is_some() && budget.is_some() {
        anyhow::bail!(
            "--memory-budget plans offloading, which a device map excludes; drop --device-map \
             (reset the map) or --memory-budget"
        );
    }
    if device_map.is_some()
        && (strategy != Strategy::None || !args.memory.keep_on_device.is_empty())
    {
        anyhow::bail!(
            "--offload and --device-map exclude each other: a device map places whole components; \
             drop --device-map (reset the map) to offload"
        );
    }
    let single_files = parse_weights(&args.weights)?;
    let (root, mut opts) = args.model.open()?;
    opts.device_map = device_map;
    opts.storage = storage;
    opts.single_files = single_files;
    opts.pin_memory = PinMemory::parse(&args.memory.pin_memory)?;
    // On a GPU, `--memory-budget ...,cpu=SIZE` bounds host RAM: the pinned copies of offloaded
    // weights (the host tier) get at most half of it, unless --pin-memory says otherwise.
    if let (Some(cpu), false, PinMemory::Auto) = (
        budget.and_then(|b| b.cpu),
        opts.device.is_cpu(),
        opts.pin_memory,
    ) {
        opts.pin_memory = PinMemory::Limit(cpu / 2);
    }
    let device = opts.device.clone();
    let init_image = args
        .init_image
        .as_deref()
        .map(|p| read_image(p, &device))
        .transpose()
        .context("cannot use --init-image")?;
    if let (Some(img), Some(path)) = (&init_image, &args.init_image) {
        let (_, _, h, w) = img.dims4()?;
        if args.width.is_some_and(|x| x != w) || args.height.is_some_and(|x| x != h) {
            anyhow::bail!(
                "--width/--height ({}x{}) differ from --init-image {} ({w}x{h}); img2img keeps \
                 the image's size: drop --width/--height or resize the image",
                args.width.unwrap_or(w),
                args.height.unwrap_or(h),
                path.display()
            );
        }
    }
    let latents = args
        .latents
        .as_deref()
        .map(|p| read_latents(p, &device))
        .transpose()?;
    let mut pipe = lowtide::pipelines::load(&root, opts)
        .with_context(|| format!("cannot load the pipeline in {}", root.display()))?;
    if let (Some(img), Some(path)) = (&init_image, &args.init_image) {
        let (_, _, h, w) = img.dims4()?;
        let m = pipe.size_multiple();
        if h % m != 0 || w % m != 0 {
            anyhow::bail!(
                "--init-image {} is {w}x{h}; img2img needs sides that are multiples of {m}: \
                 resize or crop it (diffusers would resize it to {}x{})",
                path.display(),
                w - w % m,
                h - h % m
            );
        }
    }
    let (default_steps, default_guidance) = pipe.defaults();
    let mut req = GenerateRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        steps: args.steps.unwrap_or(default_steps),
        guidance: args.guidance.unwrap_or(default_guidance),
        true_cfg: args.true_cfg,
        max_sequence_length: args.max_sequence_length,
        scheduler,
        seed: args.seed,
        width: args.width,
        height: args.height,
        num_images: args.num_images,
        latents,
        init_image,
        strength: args.strength.unwrap_or(1.0),
        // generate's --memory-budget is the whole run's (the planner's), not the VAE's own.
        vae: VaeOptions {
            memory_budget: None,
            ..args.vae.options_unbudgeted()
        },
        frames: args.frames,
        guidance_2: args.guidance_2,
        decode_chunk_size: args.vae.decode_chunk_size,
    };
    let plan = match budget {
        Some(budget) => {
            // What the user fixed is planned around: --offload for every component but those
            // kept on the device, which stay resident.
            let mut fixed = std::collections::BTreeMap::new();
            for name in pipe.base().order {
                if pipe.base().component(name).is_err() {
                    continue;
                }
                if args.memory.keep_on_device.iter().any(|k| k == name) {
                    fixed.insert(name.to_string(), Strategy::None);
                } else if let Some(s) = given {
                    fixed.insert(name.to_string(), s);
                }
            }
            for k in &args.memory.keep_on_device {
                pipe.base().component(k)?;
            }
            let opts = PlanOptions {
                budget,
                allow_lossy: args.vae.allow_lossy,
                fixed,
                fixed_resident: resident,
                baseline: args
                    .vae
                    .plan_baseline
                    .as_deref()
                    .map(parse_bytes)
                    .transpose()
                    .context("--plan-baseline")?,
            };
            let plan = plan_run(pipe.as_ref(), &req, &opts)?;
            if let Some(json) = plan_only {
                if json {
                    println!("{}", serde_json::to_string_pretty(&plan)?);
                } else {
                    print!("{}", plan.describe());
                }
                return Ok(());
            }
            apply_plan(pipe.as_mut(), &plan, &mut req)?;
            eprintln!("{}", plan_line(&plan));
            Some(plan)
        }
        None => {
            let mut plan = OffloadPlan {
                keep_on_device: args.memory.keep_on_device.clone(),
                ..OffloadPlan::uniform(strategy)
            };
            if let Some(r) = resident {
                for name in pipe.base().order {
                    if pipe.base().component(name).is_ok() {
                        plan.resident.insert(name.to_string(), r);
                    }
                }
            }
            pipe.base_mut().set_offload(&plan)?;
            None
        }
    };
    pipe.base().accounting.reset();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("denoising");
    let out = pipe.generate(&req, &mut |i, total| {
        bar.set_length(total as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    if let Some(note) = &out.vae_note {
        eprintln!("{note}");
    }
    let usage = pipe.base().accounting.report();
    let strategy_name = if plan.is_some() {
        "planned"
    } else {
        strategy.name()
    };
    eprintln!(
        "offload {}: peak resident {:.1} MiB, {:.1} MiB moved, {:.2} s moving / {:.2} s waiting, {:.2} s wall",
        strategy_name,
        usage.peak_resident_bytes as f64 / MIB,
        usage.bytes_transferred as f64 / MIB,
        usage.transfer_seconds,
        usage.stall_seconds,
        usage.wall_seconds
    );
    let written = if out.is_video() {
        lowtide::video::save_videos(&out.image, args.fps, &out_path)?
    } else {
        save_images(&out.image, &out_path)?
    };
    for p in written {
        eprintln!("wrote {}", p.display());
    }
    if let Some(path) = &args.save_tensors {
        save_tensors(path, &out.named_tensors())?;
        eprintln!("wrote {}", path.display());
    }
    let plan = plan.map(|mut p| {
        measured_phases(&mut p, &usage.timeline);
        p
    });
    if let Some(p) = &plan {
        for ph in &p.phases {
            if let Some(m) = ph.measured_peak_bytes {
                eprintln!(
                    "  {}: predicted peak {:.0} MiB, measured {:.0} MiB",
                    ph.label,
                    ph.predicted_peak_bytes as f64 / MIB,
                    m as f64 / MIB
                );
            }
        }
    }
    if let Some(path) = &args.memory.report_plot {
        let info = lowtide::plot::PlotInfo {
            title: &format!("lowtide generate: {}", root.display()),
            budget_bytes: plan.as_ref().map(|p| p.budget_bytes),
            predicted_peak_bytes: plan.as_ref().map(|p| p.predicted_peak_bytes),
        };
        lowtide::plot::draw(&usage.timeline, &info, path)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.memory.report {
        let mut v = serde_json::to_value(&usage)?;
        v["strategy"] = strategy_name.into();
        if let Some(p) = &plan {
            v["plan"] = serde_json::to_value(p)?;
        }
        if let (
            Strategy::Group {
                blocks_per_group,
                prefetch,
            },
            None,
        ) = (strategy, &plan)
        {
            v["blocks_per_group"] = blocks_per_group.into();
            v["prefetch"] = prefetch.into();
        }
        v["step_seconds"] = serde_json::to_value(&out.step_seconds)?;
        v["device"] = format!("{:?}", pipe.base().options.device).into();
        // CUDA: free/total device memory and the peak of the pool candle allocates from.
        if let Some(m) = lowtide::device::device_memory(&pipe.base().options.device) {
            v["device_memory"] = serde_json::to_value(m)?;
        }
        v["dtype"] = format!("{:?}", pipe.base().options.dtype).into();
        v["device_map"] = match pipe.base().device_map() {
            Some(m) => serde_json::to_value(&m.placement)?,
            None => serde_json::Value::Null,
        };
        write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }

    Ok(())
}

/// One line saying what the budget chose.
fn plan_line(plan: &lowtide::planner::Plan) -> String {
    let parts: Vec<String> = plan
        .components
        .iter()
        .map(|c| {
            let mut s = format!("{}={}", c.name, c.strategy);
            if let Some(k) = c.resident_groups.filter(|&k| k > 0) {
                s += &format!(" ({k} groups resident)");
            }
            s
        })
        .collect();
    let mut vae = Vec::new();
    if let Some(t) = plan.vae.tile_size {
        vae.push(format!("VAE tiles of {t} px"));
    }
    if plan.vae.slicing {
        vae.push("VAE slicing".into());
    }
    if let Some(c) = plan.vae.decode_chunk.filter(|&c| c != 1) {
        vae.push(format!("decode chunks of {c}"));
    }
    format!(
        "plan for --memory-budget {:.0} MiB: {}{}; predicted peak {:.0} MiB, {:.1} s",
        plan.budget_bytes as f64 / MIB,
        parts.join(", "),
        if vae.is_empty() {
            String::new()
        } else {
            format!(", {}", vae.join(", "))
        },
        plan.predicted_peak_bytes as f64 / MIB,
        plan.predicted_seconds
    )
}

/// Puts each timeline phase's measured peak next to the plan's phase of the same component, in
/// order.
fn measured_phases(plan: &mut lowtide::planner::Plan, timeline: &Timeline) {
    let mut next = 0;
    for p in plan.phases.iter_mut() {
        if let Some(i) = timeline.phases[next.min(timeline.phases.len())..]
            .iter()
            .position(|t| t.name == p.component)
        {
            let t = &timeline.phases[next + i];
            p.measured_peak_bytes = t.peak_rss_bytes;
            next += i + 1;
        }
    }
}

/// `lowtide plot report.json -o memory.svg`.
fn plot(report: &std::path::Path, out: &std::path::Path) -> Result<()> {
    output_path("--out", out, &["svg", "png"])?;
    let text = std::fs::read_to_string(report)
        .with_context(|| format!("cannot read {}", report.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", report.display()))?;
    let timeline: Timeline =
        serde_json::from_value(v.get("timeline").cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no `timeline`: write it with generate --report",
                report.display()
            )
        })?)
        .with_context(|| format!("{}: `timeline` is malformed", report.display()))?;
    let num = |k: &str| {
        v.get("plan")
            .and_then(|p| p.get(k))
            .and_then(|x| x.as_u64())
    };
    let title = format!("lowtide: {}", report.display());
    let info = lowtide::plot::PlotInfo {
        title: &title,
        budget_bytes: num("budget_bytes"),
        predicted_peak_bytes: num("predicted_peak_bytes"),
    };
    lowtide::plot::draw(&timeline, &info, out)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The `_class_name` of a local model folder or cached repo id, without loading anything.
fn model_class(arg: &str) -> Option<String> {
    let p = std::path::Path::new(arg);
    let root = if p.is_dir() {
        p.to_path_buf()
    } else {
        lowtide::pipelines::loader::find_in_cache(&lowtide::pipelines::hf_cache_dir(), arg, "main")?
    };
    lowtide::pipelines::ModelIndex::read(&root)
        .ok()
        .map(|i| i.class_name)
}

/// `--latents`: one finite (B, C, h, w) tensor with B ≥ 1.
fn read_latents(
    path: &std::path::Path,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    let t = read_single_tensor(path, device)
        .with_context(|| format!("cannot use --latents {}", path.display()))?;
    if !(t.rank() == 4 || t.rank() == 5) || t.dim(0)? == 0 {
        anyhow::bail!(
            "--latents {} holds a tensor of shape {:?}; expected (B, C, h, w), or \
             (B, C, T, h, w) for video, with B >= 1",
            path.display(),
            t.dims()
        );
    }
    lowtide::validate::finite(&t, || {
        format!("--latents {} holds NaN or infinite values", path.display())
    })?;
    Ok(t)
}

fn vae(command: VaeCommand) -> Result<()> {
    let (VaeCommand::Decode { vae: a, .. } | VaeCommand::Encode { vae: a, .. }) = &command;
    if a.allow_lossy {
        anyhow::bail!(
            "--allow-lossy applies to generate and plan; `vae decode/encode --memory-budget` \
             tiles when the untiled decode would not fit, and says so"
        );
    }
    match command {
        VaeCommand::Decode {
            model,
            latents,
            save_tensors: dst,
            out,
            vae: vae_args,
        } => {
            output_path("--save-tensors", &dst, &["safetensors"])?;
            let (root, opts) = model.open()?;
            let z = read_latents(&latents, &opts.device)?;
            let vae = load_any_vae(&root, &opts)
                .with_context(|| format!("cannot load the VAE of {}", root.display()))?;
            let asked = vae_args.options()?;
            let z = z.to_dtype(opts.dtype)?;
            let sample = match &vae {
                AnyVae::Image(vae) => {
                    if let Some(o) = &out {
                        output_path("--out", o, &["png"])?;
                    }
                    let (b, _, h, w) = z.dims4().context("--latents of an image VAE")?;
                    let mem = asked.plan(vae, b, h, w)?;
                    if let Some(note) = mem.budget_note(&asked) {
                        eprintln!("{note}");
                    }
                    let sample = decode_or_retry_tiled(vae, &z, &mem)?;
                    // Written before the pictures, which need it alive only as long as they
                    // are encoded.
                    save_tensors(&dst, &[("sample", &sample)])?;
                    sample
                }
                AnyVae::Video(vae) => {
                    let (b, _, t, h, w) = z.dims5().with_context(|| {
                        format!(
                            "--latents {}: a video VAE decodes (B, C, T, h, w)",
                            latents.display()
                        )
                    })?;
                    let cfg = vae.config();
                    if let Some(o) = &out {
                        lowtide::video::video_output_path("--out", o, cfg.decoded_frames(t))?;
                    }
                    let mem = video_vae_options(&vae_args)?.plan(vae, b, t, h, w)?;
                    // Pieces go straight into the file as they are decoded: the video is never
                    // held whole (with tiling, a tile's frame at a time).
                    let f = cfg.spatial_factor();
                    let shape = [
                        b,
                        cfg.image_out_channels(),
                        cfg.decoded_frames(t),
                        h * f,
                        w * f,
                    ];
                    let mut file = TensorFileWriter::create(&dst, "sample", &shape)?;
                    vae.decode_regions(&z, &mem, &mut |at, piece| file.write_region(&at, &piece))?;
                    file.finish()?;
                    if out.is_none() {
                        eprintln!("wrote {}", dst.display());
                        return Ok(());
                    }
                    read_single_tensor(&dst, &candle_core::Device::Cpu)?
                }
            };
            eprintln!("wrote {}", dst.display());
            if let Some(out) = out {
                let written = if sample.rank() == 5 {
                    let frames = ((sample / 2.0)? + 0.5)?
                        .clamp(0f32, 1f32)?
                        .permute((0, 2, 3, 4, 1))?
                        .contiguous()?;
                    lowtide::video::save_videos(&frames, 16, &out)?
                } else {
                    save_images(&lowtide::io::to_unit_hwc(&sample)?, &out)?
                };
                for p in written {
                    eprintln!("wrote {}", p.display());
                }
            }
            Ok(())
        }
        VaeCommand::Encode {
            model,
            image,
            save_tensors: dst,
            vae: vae_args,
        } => {
            output_path("--save-tensors", &dst, &["safetensors"])?;
            let (root, opts) = model.open()?;
            let vae = load_any_vae(&root, &opts)
                .with_context(|| format!("cannot load the VAE of {}", root.display()))?;
            let dist = match &vae {
                AnyVae::Image(vae) => {
                    let x = read_image_arg(&image, &opts.device)
                        .with_context(|| format!("cannot use --image {}", image.display()))?;
                    let (b, _, h, w) = x.dims4()?;
                    let f = vae.config().scale_factor();
                    let asked = vae_args.options()?;
                    let mem = asked.plan(vae, b, h / f, w / f)?;
                    if let Some(note) = mem.budget_note(&asked) {
                        eprintln!("{note}");
                    }
                    vae.encode_with(&x.to_dtype(opts.dtype)?, &mem)?
                }
                AnyVae::Video(vae) => {
                    let x = lowtide::io::read_video_arg(&image, &opts.device)
                        .with_context(|| format!("cannot use --image {}", image.display()))?;
                    let (b, _, t, h, w) = x.dims5()?;
                    let (sf, tf) = (
                        vae.config().spatial_factor(),
                        vae.config().temporal_factor(),
                    );
                    let mem = video_vae_options(&vae_args)?.plan(
                        vae,
                        b,
                        (t - 1) / tf + 1,
                        h / sf,
                        w / sf,
                    )?;
                    vae.encode_with(&x.to_dtype(opts.dtype)?, &mem)?
                }
            };
            save_tensors(&dst, &[("mean", &dist.mean), ("logvar", &dist.logvar)])?;
            eprintln!("wrote {}", dst.display());
            Ok(())
        }
    }
}

/// The video VAE's memory options from the shared VAE flags.
fn video_vae_options(args: &VaeArgs) -> Result<lowtide::models::WanVaeOptions> {
    let o = args.options()?;
    Ok(lowtide::models::WanVaeOptions {
        tiling: o.tiling,
        tile_size: o.tile_size,
        tile_overlap: o.tile_overlap,
        slicing: o.slicing,
        decode_chunk_size: args.decode_chunk_size,
        memory_budget: o.memory_budget,
    })
}
