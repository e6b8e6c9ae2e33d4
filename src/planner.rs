//! The memory planner: from one budget to the fastest run that fits.
//!
//! A pipeline declares what a run needs (`Pipeline::phases`): its phases in order (one active
//! component each: text encoding, denoising, decoding), the compute of each pass and the
//! activation bytes of each phase, with the alternatives a phase offers (VAE slicing, tiles,
//! temporal chunks, each marked exact or lossy). Its components' weight sizes come from their
//! declarations (`ManagedWeights::unit_bytes`). Nothing here knows a family.
//!
//! For every assignment of a strategy to each component — `none`, `model`, `group` with `K`
//! resident groups, `sequential` — and of an alternative to each phase, the planner predicts the
//! peak of each phase (what the process already holds, the weights resident then, the phase's
//! activations) and the run's time, and picks the fastest plan whose every phase fits. The
//! search is exact and small: only the set of components kept resident (`none`) links phases,
//! since an offloaded component holds nothing outside its own phases; for each such set every
//! other component picks its fastest option that fits its own phases.
//!
//! Time model: compute (the phase's declared flops at a measured GEMM rate, see
//! [`Calibration`]) plus the bytes a plan moves (at a measured read rate). On the CPU the moves
//! cost CPU time the computation also needs (mapping or converting pages uses the same cores),
//! so they add up; on a GPU a prefetched group's copy overlaps the computation, and only what
//! the computation cannot cover is added.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::residency::manager::Resident;
use crate::residency::Strategy;
use crate::validate::human_bytes;

/// A component's weights as the planner sees them (bytes as held: storage dtypes applied).
#[derive(Debug, Clone, Default)]
pub struct ComponentInfo {
    pub name: String,
    /// Every declared weight but the on-demand ones.
    pub total_bytes: u64,
    /// Weights loaded only at first use (a VAE's encoder): counted in phases that use them.
    pub on_demand_bytes: u64,
    /// Weights outside every offload unit (resident under group offload).
    pub outside_bytes: u64,
    /// Each offload unit's weights, in construction (= execution) order.
    pub unit_bytes: Vec<u64>,
    /// The largest layer: what sequential offload holds at once.
    pub largest_layer_bytes: u64,
    /// Weights converted as they are read (e.g. bf16 files computed in f32).
    pub converted_bytes: u64,
    /// File bytes of the largest weight converted as it is read: while it loads, its read
    /// buffer sits next to its converted copy (UMT5's 2 GiB bf16 embedding next to its 4 GiB
    /// in f32), under every strategy.
    pub largest_read_buffer: u64,
}

/// What streaming converted weights holds beyond the weights, per streamed unit's bytes: each
/// weight passes through a read buffer of its file's dtype, and the freed groups' buffers go
/// back to the system a little late. Measured on the full-size FLUX.1 (bf16 files, f32
/// compute, group offload): about half a group over the weights.
pub const CONVERSION_TRANSIENT: f64 = 0.55;

fn transient(c: &ComponentInfo, unit: u64) -> u64 {
    let share = c.converted_bytes as f64 / c.total_bytes.max(1) as f64;
    (share.min(1.0) * unit as f64 * CONVERSION_TRANSIENT) as u64
}

/// How a phase may run its activations: the default first, then alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActChoice {
    pub label: String,
    /// The phase's peak activation bytes (beyond the weights).
    pub bytes: f64,
    /// Bit-identical to the default (slicing, temporal chunks); tiling is not.
    pub exact: bool,
    /// Compute time relative to the default (tiles overlap, so they redo work).
    pub cost: f64,
    pub vae: VaeChoice,
}

impl ActChoice {
    /// A phase with no alternative: its activations, exact.
    pub fn only(bytes: f64) -> Vec<Self> {
        vec![Self {
            label: String::new(),
            bytes,
            exact: true,
            cost: 1.0,
            vae: VaeChoice::default(),
        }]
    }
}

/// What an [`ActChoice`] sets on the VAE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct VaeChoice {
    /// Tile size in pixels (tiling on).
    pub tile_size: Option<usize>,
    pub slicing: bool,
    /// Video VAE: latent frames per decode chunk.
    pub decode_chunk: Option<usize>,
}

/// One phase of a run, as its family declares it.
#[derive(Debug, Clone)]
pub struct PhaseNeed {
    /// What runs (e.g. "text encoding", "denoising", "VAE decode").
    pub label: String,
    /// The component active in it.
    pub component: String,
    /// Passes through the component (denoising: steps × calls per step; decode: 1).
    pub passes: usize,
    /// Floating-point operations of one pass.
    pub flops: f64,
    /// Whether it uses the component's on-demand weights (img2img's VAE encoder).
    pub uses_on_demand: bool,
    /// At least one: the default first.
    pub choices: Vec<ActChoice>,
}

/// Machine rates the time model uses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    /// Bytes per second of loading weights (read, mapped or converted into the held form).
    pub read_bytes_per_s: f64,
    /// Sustained f32 GEMM rate of the compute device.
    pub flops_per_s: f64,
    /// Where the figures came from ("measured", "cached ...").
    pub source: String,
}

/// The limits and what the user fixed.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    /// The budget for the process (CPU) or the device (GPU), bytes.
    pub budget: u64,
    /// What the process (or device) holds before any weight is loaded.
    pub baseline: u64,
    /// Lossy alternatives (tiling) may be chosen.
    pub allow_lossy: bool,
    /// Strategies the user gave (`--offload`, `--keep-on-device`), per component.
    pub fixed: BTreeMap<String, Strategy>,
    /// Partial residency the user gave (`--resident-groups`/`--resident-bytes`).
    pub fixed_resident: Option<Resident>,
    /// A GPU: prefetched copies overlap the computation.
    pub overlapped_transfers: bool,
    /// The share of the budget plans leave free (the estimates' error).
    pub margin: f64,
}

impl Constraints {
    /// What a plan's predicted peak may reach.
    pub fn limit(&self) -> u64 {
        self.budget - (self.budget as f64 * self.margin.clamp(0.0, 0.5)) as u64
    }
}

/// One component's part of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentPlan {
    pub name: String,
    pub strategy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks_per_group: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_groups: Option<usize>,
    /// Weights resident for the whole run under group offload (partial residency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    /// Whether the user fixed the strategy.
    pub fixed: bool,
    #[serde(skip)]
    pub choice: Option<(Strategy, Resident)>,
}

/// One phase's part of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhasePlan {
    pub label: String,
    pub component: String,
    /// The activation alternative chosen.
    pub memory: String,
    pub predicted_peak_bytes: u64,
    pub weights_bytes: u64,
    pub activation_bytes: u64,
    pub predicted_seconds: f64,
    /// Weight bytes the phase loads.
    pub moved_bytes: u64,
    /// Measured after a run: the phase's peak RSS (or device peak).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_peak_bytes: Option<u64>,
}

/// A plan that lost, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerUp {
    pub description: String,
    pub predicted_peak_bytes: u64,
    pub predicted_seconds: f64,
    pub fits: bool,
    pub why: String,
}

/// The chosen plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub budget_bytes: u64,
    pub baseline_bytes: u64,
    pub predicted_peak_bytes: u64,
    pub predicted_seconds: f64,
    pub components: Vec<ComponentPlan>,
    pub phases: Vec<PhasePlan>,
    pub vae: VaeChoice,
    pub calibration: Calibration,
    pub runners_up: Vec<RunnerUp>,
    /// What a lossy alternative would gain, when the user has not allowed one.
    pub notes: Vec<String>,
}

impl Plan {
    /// The strategy and partial residency chosen for `component`.
    pub fn choice(&self, component: &str) -> Option<(Strategy, Resident)> {
        self.components
            .iter()
            .find(|c| c.name == component)
            .and_then(|c| c.choice)
    }

    /// A few lines for a terminal.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "plan for a budget of {} ({} held before loading): predicted peak {}, {:.1} s\n",
            human_bytes(self.budget_bytes as f64),
            human_bytes(self.baseline_bytes as f64),
            human_bytes(self.predicted_peak_bytes as f64),
            self.predicted_seconds
        );
        for c in &self.components {
            s += &format!(
                "  {:<15} {}{}\n",
                c.name,
                describe_choice(c),
                fixed_tag(c.fixed)
            );
        }
        s += "  phases:\n";
        for p in &self.phases {
            s += &format!(
                "    {:<22} peak {:>10} (weights {}, activations {}){}, {:.2} s, moves {}{}\n",
                p.label,
                human_bytes(p.predicted_peak_bytes as f64),
                human_bytes(p.weights_bytes as f64),
                human_bytes(p.activation_bytes as f64),
                if p.memory.is_empty() {
                    String::new()
                } else {
                    format!(", {}", p.memory)
                },
                p.predicted_seconds,
                human_bytes(p.moved_bytes as f64),
                p.measured_peak_bytes
                    .map(|m| format!(", measured {}", human_bytes(m as f64)))
                    .unwrap_or_default()
            );
        }
        if !self.runners_up.is_empty() {
            s += "  runners-up:\n";
            for r in &self.runners_up {
                s += &format!("    {:<40} {}\n", r.description, r.why);
            }
        }
        for n in &self.notes {
            s += &format!("  note: {n}\n");
        }
        s += &format!(
            "  time model: {}/s reads, {:.1} GFLOP/s ({})\n",
            human_bytes(self.calibration.read_bytes_per_s),
            self.calibration.flops_per_s / 1e9,
            self.calibration.source
        );
        s
    }
}

fn fixed_tag(fixed: bool) -> &'static str {
    if fixed {
        " (as given)"
    } else {
        ""
    }
}

fn describe_choice(c: &ComponentPlan) -> String {
    match (c.blocks_per_group, c.resident_groups) {
        (Some(bpg), Some(k)) if k > 0 => format!(
            "group ({bpg} per group), {k} group(s) resident ({})",
            human_bytes(c.resident_bytes.unwrap_or(0) as f64)
        ),
        (Some(bpg), _) => format!("group ({bpg} per group)"),
        _ => c.strategy.clone(),
    }
}

/// A component's candidate option and what it costs in its phases.
#[derive(Debug, Clone, Copy)]
struct Opt {
    strategy: Strategy,
    resident: Resident,
    /// Resident bytes while the component is active (on-demand weights apart).
    active: u64,
    /// Bytes resident for the whole run under partial residency.
    kept: u64,
    groups_kept: usize,
}

/// Group sizes for `blocks_per_group` consecutive units.
fn groups_of(units: &[u64], bpg: usize) -> Vec<u64> {
    units.chunks(bpg.max(1)).map(|c| c.iter().sum()).collect()
}

/// Peak resident bytes of a component under group offload with the groups `keep` resident:
/// the resident ones, the current streamed group and (with prefetch) the next streamed one.
pub fn group_peak(groups: &[u64], keep: &[usize], prefetch: bool) -> u64 {
    let n = groups.len();
    let kept: u64 = keep.iter().map(|&i| groups[i]).sum();
    let streamed = |i: usize| !keep.contains(&i);
    let mut worst = 0u64;
    for i in 0..n {
        let cur = if streamed(i) { groups[i] } else { 0 };
        let next = if prefetch {
            (1..n)
                .map(|d| (i + d) % n)
                .find(|&j| streamed(j))
                .filter(|&j| j != i)
                .map_or(0, |j| groups[j])
        } else {
            0
        };
        worst = worst.max(cur + next);
    }
    kept + worst
}

fn options(
    c: &ComponentInfo,
    fixed: Option<Strategy>,
    fixed_resident: Option<Resident>,
) -> Vec<Opt> {
    let mut v = options_of(c, fixed, fixed_resident);
    for o in &mut v {
        o.active += c.largest_read_buffer;
    }
    v
}

fn options_of(
    c: &ComponentInfo,
    fixed: Option<Strategy>,
    fixed_resident: Option<Resident>,
) -> Vec<Opt> {
    let plain = |strategy, active| Opt {
        strategy,
        resident: Resident::Nothing,
        active,
        kept: 0,
        groups_kept: 0,
    };
    let group = |bpg: usize, prefetch: bool| -> Vec<Opt> {
        let groups = groups_of(&c.unit_bytes, bpg);
        let residents: Vec<Resident> = match fixed_resident {
            Some(r) => vec![r],
            None => (0..=groups.len()).map(Resident::Groups).collect(),
        };
        residents
            .into_iter()
            .map(|r| {
                let keep = crate::residency::manager::resident_groups(&groups, r);
                Opt {
                    strategy: Strategy::Group {
                        blocks_per_group: bpg,
                        prefetch,
                    },
                    resident: r,
                    active: c.outside_bytes
                        + group_peak(&groups, &keep, prefetch)
                        + transient(
                            c,
                            (0..groups.len())
                                .filter(|i| !keep.contains(i))
                                .map(|i| groups[i])
                                .max()
                                .unwrap_or(0),
                        ),
                    kept: keep.iter().map(|&i| groups[i]).sum(),
                    groups_kept: keep.len(),
                }
            })
            .collect()
    };
    match fixed {
        Some(Strategy::None) => vec![plain(Strategy::None, c.total_bytes)],
        Some(Strategy::Model) => vec![plain(Strategy::Model, c.total_bytes)],
        Some(Strategy::Sequential) => vec![plain(
            Strategy::Sequential,
            c.largest_layer_bytes + transient(c, c.largest_layer_bytes),
        )],
        Some(Strategy::Group {
            blocks_per_group,
            prefetch,
        }) => group(blocks_per_group, prefetch),
        None => {
            let mut v = vec![
                plain(Strategy::None, c.total_bytes),
                plain(Strategy::Model, c.total_bytes),
            ];
            if !c.unit_bytes.is_empty() {
                v.extend(group(1, true));
            }
            v.push(plain(
                Strategy::Sequential,
                c.largest_layer_bytes + transient(c, c.largest_layer_bytes),
            ));
            v
        }
    }
}

/// Weight bytes a component moves in a phase of `passes` passes under `o`, given whether its
/// weights are already resident from an earlier phase (`none`).
fn moved(c: &ComponentInfo, o: &Opt, passes: usize, loaded_before: bool) -> u64 {
    let p = passes.max(1) as u64;
    match o.strategy {
        Strategy::None if loaded_before => 0,
        Strategy::None | Strategy::Model => c.total_bytes,
        // The first pass loads everything; later ones the streamed groups.
        Strategy::Group { .. } => {
            c.total_bytes + (p - 1) * (c.total_bytes - c.outside_bytes - o.kept)
        }
        Strategy::Sequential => c.total_bytes * p,
    }
}

struct Eval {
    phases: Vec<PhasePlan>,
    peak: u64,
    seconds: f64,
    fits: bool,
    opts: BTreeMap<String, Opt>,
    vae: VaeChoice,
    /// The first phase over the budget, and by how much.
    over: Option<(String, u64)>,
    lossy: bool,
}

struct Ctx<'a> {
    comps: &'a [ComponentInfo],
    phases: &'a [PhaseNeed],
    cons: &'a Constraints,
    cal: &'a Calibration,
}

impl Ctx<'_> {
    fn comp(&self, name: &str) -> Option<&ComponentInfo> {
        self.comps.iter().find(|c| c.name == name)
    }

    fn phase_time(&self, p: &PhaseNeed, choice: &ActChoice, moved: u64, o: &Opt) -> f64 {
        let compute = p.passes.max(1) as f64 * p.flops * choice.cost / self.cal.flops_per_s;
        let transfer = moved as f64 / self.cal.read_bytes_per_s;
        let hidden = matches!(o.strategy, Strategy::Group { prefetch: true, .. })
            && self.cons.overlapped_transfers;
        if hidden {
            compute.max(transfer)
        } else {
            compute + transfer
        }
    }

    /// Evaluates a full assignment; `choose_act` picks each phase's alternative (fastest that
    /// fits, when `None` is passed for a phase's fixed index).
    fn eval(&self, opts: &BTreeMap<String, Opt>, allow_lossy: bool) -> Eval {
        let mut phases = Vec::new();
        let (mut peak, mut seconds, mut fits) = (self.cons.baseline, 0.0, true);
        let mut over = None;
        let mut vae = VaeChoice::default();
        let mut lossy = false;
        for (i, p) in self.phases.iter().enumerate() {
            let Some(c) = self.comp(&p.component) else {
                continue;
            };
            let Some(o) = opts.get(&p.component) else {
                continue;
            };
            // Weights: every `none` component used up to here (its on-demand part if used),
            // and the active one.
            let mut weights = 0u64;
            for other in self.comps {
                let uses: Vec<&PhaseNeed> = self.phases[..=i]
                    .iter()
                    .filter(|q| q.component == other.name)
                    .collect();
                if uses.is_empty() {
                    continue;
                }
                let on_demand = if uses.iter().any(|q| q.uses_on_demand) {
                    other.on_demand_bytes
                } else {
                    0
                };
                let oo = &opts[&other.name];
                if other.name == p.component {
                    weights += o.active
                        + if p.uses_on_demand || oo.strategy == Strategy::None {
                            on_demand
                        } else {
                            0
                        };
                } else if oo.strategy == Strategy::None {
                    weights += oo.active + on_demand;
                }
            }
            let loaded_before = self.phases[..i].iter().any(|q| q.component == p.component);
            let mv = moved(
                c,
                o,
                p.passes,
                loaded_before && o.strategy == Strategy::None,
            ) + if p.uses_on_demand {
                c.on_demand_bytes
            } else {
                0
            };
            let base = self.cons.baseline + weights;
            // The fastest allowed alternative that fits, else the smallest allowed one.
            let allowed: Vec<&ActChoice> = p
                .choices
                .iter()
                .filter(|a| a.exact || allow_lossy)
                .collect();
            let pick = allowed
                .iter()
                .filter(|a| base as f64 + a.bytes <= self.cons.limit() as f64)
                .min_by(|a, b| a.cost.total_cmp(&b.cost))
                .or_else(|| allowed.iter().min_by(|a, b| a.bytes.total_cmp(&b.bytes)))
                .copied();
            let Some(a) = pick else { continue };
            lossy |= !a.exact;
            if p.component.starts_with("vae") || a.vae != VaeChoice::default() {
                vae = merge(vae, a.vae);
            }
            let phase_peak = base + a.bytes.ceil() as u64;
            if phase_peak > self.cons.limit() && over.is_none() {
                over = Some((p.label.clone(), phase_peak - self.cons.limit()));
            }
            fits &= phase_peak <= self.cons.limit();
            peak = peak.max(phase_peak);
            let t = self.phase_time(p, a, mv, o);
            seconds += t;
            phases.push(PhasePlan {
                label: p.label.clone(),
                component: p.component.clone(),
                memory: if a.label == p.choices[0].label && p.choices.len() == 1 {
                    String::new()
                } else {
                    a.label.clone()
                },
                predicted_peak_bytes: phase_peak,
                weights_bytes: weights,
                activation_bytes: a.bytes.ceil() as u64,
                predicted_seconds: t,
                moved_bytes: mv,
                measured_peak_bytes: None,
            });
        }
        Eval {
            phases,
            peak,
            seconds,
            fits,
            opts: opts.clone(),
            vae,
            over,
            lossy,
        }
    }

    /// The best assignment when `keep` (components kept resident) is fixed: every other
    /// component independently takes its fastest option that fits its phases.
    fn best_for(&self, none_set: &[&str], allow_lossy: bool) -> Option<Eval> {
        let mut opts: BTreeMap<String, Opt> = BTreeMap::new();
        let mut free = Vec::new();
        for c in self.comps {
            let fixed = self.cons.fixed.get(&c.name).copied();
            let all = options(c, fixed, self.cons.fixed_resident);
            if none_set.contains(&c.name.as_str()) {
                let o = all.iter().find(|o| o.strategy == Strategy::None)?;
                opts.insert(c.name.clone(), *o);
            } else {
                let rest: Vec<Opt> = all
                    .into_iter()
                    .filter(|o| o.strategy != Strategy::None || fixed == Some(Strategy::None))
                    .collect();
                if rest.is_empty() {
                    return None;
                }
                if rest.iter().any(|o| o.strategy == Strategy::None) {
                    // Fixed to none by the user but not in this set: not this set.
                    return None;
                }
                opts.insert(c.name.clone(), rest[0]);
                free.push((c.name.clone(), rest));
            }
        }
        // Components are independent given the none set: choose each one's best in turn.
        for (name, cands) in &free {
            // The fastest option that fits its phases; if none does, the smallest.
            let mut best: Option<(Opt, f64, bool, u64)> = None;
            for o in cands {
                opts.insert(name.clone(), *o);
                let e = self.eval(&opts, allow_lossy);
                let mine = || e.phases.iter().filter(|p| &p.component == name);
                let peak = mine().map(|p| p.predicted_peak_bytes).max().unwrap_or(0);
                let ok = peak <= self.cons.limit();
                let t: f64 = mine().map(|p| p.predicted_seconds).sum();
                let better = match &best {
                    None => true,
                    Some((_, bt, bok, bpeak)) => {
                        // Fitting beats not fitting; then the faster, or the smaller.
                        match (ok, *bok) {
                            (true, false) => true,
                            (true, true) => t < *bt - 1e-9,
                            (false, false) => peak < *bpeak,
                            (false, true) => false,
                        }
                    }
                };
                if better {
                    best = Some((*o, t, ok, peak));
                }
            }
            if let Some((o, ..)) = best {
                opts.insert(name.clone(), o);
            }
        }
        Some(self.eval(&opts, allow_lossy))
    }

    fn search(&self, allow_lossy: bool) -> Vec<Eval> {
        let free: Vec<&str> = self.comps.iter().map(|c| c.name.as_str()).collect();
        let mut out = Vec::new();
        for mask in 0u32..(1 << free.len()) {
            let set: Vec<&str> = free
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, n)| *n)
                .collect();
            if let Some(e) = self.best_for(&set, allow_lossy) {
                out.push(e);
            }
        }
        out
    }

    /// A uniform strategy for every component the user did not fix, as a user would set it.
    fn uniform(&self, s: Strategy, allow_lossy: bool) -> Option<Eval> {
        let mut opts = BTreeMap::new();
        for c in self.comps {
            let fixed = self.cons.fixed.get(&c.name).copied();
            let all = options(c, fixed.or(Some(s)), self.cons.fixed_resident);
            let o = if fixed.is_none() && matches!(s, Strategy::Group { .. }) {
                // Plain group offload: nothing resident unless the user said so.
                all.iter()
                    .find(|o| o.groups_kept == 0 || self.cons.fixed_resident.is_some())
                    .copied()
                    .or(all.first().copied())?
            } else {
                *all.first()?
            };
            opts.insert(c.name.clone(), o);
        }
        Some(self.eval(&opts, allow_lossy))
    }
}

fn merge(a: VaeChoice, b: VaeChoice) -> VaeChoice {
    VaeChoice {
        tile_size: b.tile_size.or(a.tile_size),
        slicing: a.slicing || b.slicing,
        decode_chunk: b.decode_chunk.or(a.decode_chunk),
    }
}

fn summary(e: &Eval, comps: &[ComponentInfo]) -> String {
    comps
        .iter()
        .filter_map(|c| e.opts.get(&c.name).map(|o| (c, o)))
        .map(|(c, o)| {
            let s = match o.strategy {
                Strategy::Group { .. } if o.groups_kept > 0 => {
                    format!("group+{}", o.groups_kept)
                }
                s => s.name().to_string(),
            };
            format!("{}={s}", c.name)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Plans a run. Errors when no plan fits, stating the smallest peak any plan reaches and what
/// would lower it.
pub fn plan(
    comps: &[ComponentInfo],
    phases: &[PhaseNeed],
    cons: &Constraints,
    cal: &Calibration,
) -> Result<Plan> {
    let ctx = Ctx {
        comps,
        phases,
        cons,
        cal,
    };
    let cands = ctx.search(cons.allow_lossy);
    // The fastest; among plans within 1 % of it (the time model cannot tell them apart), the
    // one moving the fewest bytes, then the one streaming least (whole components before
    // groups before layers), then the smallest.
    let fastest = cands
        .iter()
        .filter(|e| e.fits)
        .map(|e| e.seconds)
        .fold(f64::INFINITY, f64::min);
    let best = cands
        .iter()
        .filter(|e| e.fits && e.seconds <= fastest * 1.01 + 1e-9)
        .min_by_key(|e| (moved_total(e), streaming_rank(e), e.peak));
    let Some(best) = best else {
        return Err(too_small(&ctx, &cands));
    };
    let mut notes = Vec::new();
    if !cons.allow_lossy {
        let lossy = ctx.search(true);
        if let Some(l) = lossy
            .iter()
            .filter(|e| e.fits && e.lossy)
            .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
        {
            if l.seconds < best.seconds * 0.95 {
                notes.push(format!(
                    "with --allow-lossy (VAE tiling, not bit-identical) a plan of {:.1} s would fit: {}",
                    l.seconds,
                    summary(l, comps)
                ));
            }
        }
    }
    let mut runners_up = Vec::new();
    for (label, s) in [
        ("--offload none", Strategy::None),
        ("--offload model", Strategy::Model),
        (
            "--offload group",
            Strategy::Group {
                blocks_per_group: 1,
                prefetch: true,
            },
        ),
        ("--offload sequential", Strategy::Sequential),
    ] {
        let Some(e) = ctx.uniform(s, cons.allow_lossy) else {
            continue;
        };
        let why = if !e.fits {
            let (phase, by) = e.over.clone().unwrap_or_default();
            format!(
                "does not fit: {phase} needs {} more than the budget",
                human_bytes(by as f64)
            )
        } else if same_plan(&e, best) {
            "same as the chosen plan".to_string()
        } else if e.seconds <= best.seconds * 1.01 + 1e-9 {
            format!(
                "fits and is as fast (within 1 %), but moves {} and peaks at {} against {} and {}",
                human_bytes(moved_total(&e) as f64),
                human_bytes(e.peak as f64),
                human_bytes(moved_total(best) as f64),
                human_bytes(best.peak as f64),
            )
        } else {
            format!(
                "fits, but predicted {:.1} s against {:.1} s (moves {} against {})",
                e.seconds,
                best.seconds,
                human_bytes(e.phases.iter().map(|p| p.moved_bytes as f64).sum()),
                human_bytes(best.phases.iter().map(|p| p.moved_bytes as f64).sum()),
            )
        };
        runners_up.push(RunnerUp {
            description: label.to_string(),
            predicted_peak_bytes: e.peak,
            predicted_seconds: e.seconds,
            fits: e.fits,
            why,
        });
    }
    let components = comps
        .iter()
        .map(|c| {
            let o = best.opts[&c.name];
            let (bpg, k, kb) = match o.strategy {
                Strategy::Group {
                    blocks_per_group, ..
                } => (Some(blocks_per_group), Some(o.groups_kept), Some(o.kept)),
                _ => (None, None, None),
            };
            ComponentPlan {
                name: c.name.clone(),
                strategy: o.strategy.name().to_string(),
                blocks_per_group: bpg,
                resident_groups: k,
                resident_bytes: kb,
                fixed: cons.fixed.contains_key(&c.name),
                choice: Some((o.strategy, o.resident)),
            }
        })
        .collect();
    Ok(Plan {
        budget_bytes: cons.budget,
        baseline_bytes: cons.baseline,
        predicted_peak_bytes: best.peak,
        predicted_seconds: best.seconds,
        components,
        phases: best.phases.clone(),
        vae: best.vae,
        calibration: cal.clone(),
        runners_up,
        notes,
    })
}

fn moved_total(e: &Eval) -> u64 {
    e.phases.iter().map(|p| p.moved_bytes).sum()
}

/// How much a plan streams: 0 per whole component (`none`, `model`), 1 per grouped one, 2 per
/// sequential one.
fn streaming_rank(e: &Eval) -> u32 {
    e.opts
        .values()
        .map(|o| match o.strategy {
            Strategy::None | Strategy::Model => 0,
            Strategy::Group { .. } => 1,
            Strategy::Sequential => 2,
        })
        .sum()
}

fn same_plan(a: &Eval, b: &Eval) -> bool {
    a.opts.iter().all(|(k, o)| {
        b.opts.get(k).is_some_and(|p| {
            p.strategy == o.strategy && p.groups_kept == o.groups_kept && p.kept == o.kept
        })
    }) && a.vae == b.vae
}

fn too_small(ctx: &Ctx, cands: &[Eval]) -> Error {
    let smallest = cands.iter().min_by_key(|e| e.peak);
    let lossy = if ctx.cons.allow_lossy {
        None
    } else {
        ctx.search(true).into_iter().min_by_key(|e| e.peak)
    };
    let min = smallest.map_or(0, |e| e.peak);
    let mut hint = String::from("raise --memory-budget");
    if let Some(l) = &lossy {
        if l.peak < min {
            hint += &format!(
                ", or allow VAE tiling with --allow-lossy (then {} suffices)",
                human_bytes(l.peak as f64)
            );
        }
    }
    hint += "; a smaller --width/--height, --num-images or --frames lowers the activations, and \
             --storage-dtype bf16 (or fp8) halves (quarters) the weights";
    let what = smallest.map_or_else(String::new, |e| {
        let worst = e
            .phases
            .iter()
            .max_by_key(|p| p.predicted_peak_bytes)
            .map(|p| {
                format!(
                    "; its largest phase, {}, holds {} of weights and {} of activations",
                    p.label,
                    human_bytes(p.weights_bytes as f64),
                    human_bytes(p.activation_bytes as f64)
                )
            })
            .unwrap_or_default();
        format!("the smallest plan ({}){worst}", summary(e, ctx.comps))
    });
    Error::InsufficientMemory {
        what: format!(
            "no plan fits --memory-budget {}: {what}",
            human_bytes(ctx.cons.budget as f64)
        ),
        needed: human_bytes(min as f64),
        available: format!(
            "the budget is {}{};",
            human_bytes(ctx.cons.budget as f64),
            if ctx.cons.margin > 0.0 {
                format!(
                    " (plans keep {:.0} % of it free for the estimates' error)",
                    ctx.cons.margin * 100.0
                )
            } else {
                String::new()
            }
        ),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn comp(name: &str, units: &[u64], outside: u64) -> ComponentInfo {
        let total = units.iter().sum::<u64>() + outside;
        ComponentInfo {
            name: name.into(),
            total_bytes: total,
            on_demand_bytes: 0,
            outside_bytes: outside,
            unit_bytes: units.to_vec(),
            largest_layer_bytes: units.iter().copied().max().unwrap_or(outside) / 2,
            converted_bytes: 0,
            largest_read_buffer: 0,
        }
    }

    fn phase(label: &str, c: &str, passes: usize, act: f64) -> PhaseNeed {
        PhaseNeed {
            label: label.into(),
            component: c.into(),
            passes,
            flops: 1e9,
            uses_on_demand: false,
            choices: vec![ActChoice {
                label: "default".into(),
                bytes: act,
                exact: true,
                cost: 1.0,
                vae: VaeChoice::default(),
            }],
        }
    }

    fn sd_like() -> (Vec<ComponentInfo>, Vec<PhaseNeed>) {
        let comps = vec![
            comp("text_encoder", &[40 * MB; 12], 20 * MB),
            comp(
                "unet",
                &[100 * MB, 300 * MB, 300 * MB, 200 * MB, 100 * MB],
                50 * MB,
            ),
            comp("vae", &[30 * MB; 4], 10 * MB),
        ];
        let mut vae = phase("VAE decode", "vae", 1, 400.0 * MB as f64);
        vae.choices.push(ActChoice {
            label: "tiles of 256 px".into(),
            bytes: 100.0 * MB as f64,
            exact: false,
            cost: 1.3,
            vae: VaeChoice {
                tile_size: Some(256),
                ..VaeChoice::default()
            },
        });
        let phases = vec![
            phase("text encoding", "text_encoder", 1, 10.0 * MB as f64),
            phase("denoising", "unet", 20, 200.0 * MB as f64),
            vae,
        ];
        (comps, phases)
    }

    fn cal() -> Calibration {
        Calibration {
            read_bytes_per_s: 2e9,
            flops_per_s: 1e11,
            source: "test".into(),
        }
    }

    fn cons(budget: u64) -> Constraints {
        Constraints {
            budget,
            baseline: 30 * MB,
            ..Constraints::default()
        }
    }

    #[test]
    fn everything_fits_keeps_everything_resident() {
        let (c, p) = sd_like();
        let plan = super::plan(&c, &p, &cons(8 << 30), &cal()).unwrap();
        // Nothing streamed: every component loaded once, resident (none) or one at a time
        // (model, which costs nothing more and peaks lower).
        for c in &plan.components {
            assert!(
                matches!(c.strategy.as_str(), "none" | "model"),
                "{}",
                plan.describe()
            );
        }
        let unet = plan.phases.iter().find(|p| p.component == "unet").unwrap();
        assert_eq!(unet.moved_bytes, 1050 * MB);
        assert!(plan.predicted_peak_bytes <= 8 << 30);
        assert_eq!(plan.vae, VaeChoice::default());
        assert!(plan
            .runners_up
            .iter()
            .any(|r| r.description == "--offload none" && r.fits));
    }

    #[test]
    fn a_partial_fit_keeps_the_largest_groups_resident() {
        let (c, p) = sd_like();
        // unet: 1050 MB, 1280 MB with its activations and the baseline. 1150 MB of budget: not
        // whole, but one 300 MB group resident (two would need 1180 MB).
        let plan = super::plan(&c, &p, &cons(1150 * MB), &cal()).unwrap();
        let (s, r) = plan.choice("unet").unwrap();
        assert!(matches!(s, Strategy::Group { .. }), "{s:?}");
        let Resident::Groups(k) = r else {
            panic!("{r:?}")
        };
        assert_eq!(k, 1, "{}", plan.describe());
        assert!(plan.predicted_peak_bytes <= 1150 * MB);
        let unet = plan.components.iter().find(|c| c.name == "unet").unwrap();
        // A 300 MB group is the one kept.
        assert_eq!(unet.resident_bytes, Some(300 * MB), "{}", plan.describe());
        // Plain group offload fits too, but moves more.
        let g = plan
            .runners_up
            .iter()
            .find(|r| r.description == "--offload group")
            .unwrap();
        assert!(
            g.fits && g.predicted_seconds > plan.predicted_seconds,
            "{g:?}"
        );
        let none = plan
            .runners_up
            .iter()
            .find(|r| r.description == "--offload none")
            .unwrap();
        assert!(!none.fits && none.why.contains("does not fit"), "{none:?}");
    }

    #[test]
    fn only_sequential_fits() {
        let (c, p) = sd_like();
        // Group offload needs two 300 MB groups at once plus the outside weights; sequential a
        // half-unit layer.
        let plan = super::plan(&c, &p, &cons(500 * MB), &cal()).unwrap();
        assert_eq!(
            plan.choice("unet").unwrap().0,
            Strategy::Sequential,
            "{}",
            plan.describe()
        );
        assert!(plan.predicted_peak_bytes <= 500 * MB);
    }

    #[test]
    fn nothing_fits_names_the_minimum_and_what_lowers_it() {
        let (c, p) = sd_like();
        let e = super::plan(&c, &p, &cons(400 * MB), &cal())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no plan fits"), "{e}");
        assert!(e.contains("--allow-lossy"), "{e}");
        assert!(e.contains("VAE decode"), "{e}");
        // The smallest exact plan needs the untiled decode: 30 MB + 400 MB + the VAE layer.
        assert!(e.contains("needs about 4"), "{e}");
        // With tiling allowed it fits, and the plan says which tile.
        let mut k = cons(400 * MB);
        k.allow_lossy = true;
        let plan = super::plan(&c, &p, &k, &cal()).unwrap();
        assert_eq!(plan.vae.tile_size, Some(256));
    }

    #[test]
    fn user_fixed_flags_are_kept_and_planned_around() {
        let (c, p) = sd_like();
        let mut k = cons(8 << 30);
        k.fixed.insert("unet".into(), Strategy::Sequential);
        let plan = super::plan(&c, &p, &k, &cal()).unwrap();
        assert_eq!(plan.choice("unet").unwrap().0, Strategy::Sequential);
        assert!(plan.components.iter().any(|c| c.name == "unet" && c.fixed));
        // A fixed group size, with the resident groups left to the planner.
        let mut k = cons(1400 * MB);
        k.fixed.insert(
            "unet".into(),
            Strategy::Group {
                blocks_per_group: 2,
                prefetch: true,
            },
        );
        let plan = super::plan(&c, &p, &k, &cal()).unwrap();
        let (s, r) = plan.choice("unet").unwrap();
        assert_eq!(
            s,
            Strategy::Group {
                blocks_per_group: 2,
                prefetch: true
            }
        );
        assert!(matches!(r, Resident::Groups(k) if k >= 1), "{r:?}");
        // A fixed strategy that cannot fit is an error, not overridden.
        let mut k = cons(500 * MB);
        k.fixed.insert("unet".into(), Strategy::None);
        assert!(plan_err(&c, &p, &k).contains("no plan fits"));
    }

    fn plan_err(c: &[ComponentInfo], p: &[PhaseNeed], k: &Constraints) -> String {
        plan(c, p, k, &cal()).unwrap_err().to_string()
    }

    #[test]
    fn group_peak_counts_resident_current_and_prefetched() {
        let g = [10, 30, 20, 40];
        assert_eq!(group_peak(&g, &[], true), 60); // 40 then 10, or 20 then 40
        assert_eq!(group_peak(&g, &[], false), 40);
        // 40 resident: the streamed pairs are 10+30, 30+20, 20+10.
        assert_eq!(group_peak(&g, &[3], true), 40 + 50);
        // Everything resident: nothing streamed.
        assert_eq!(group_peak(&g, &[0, 1, 2, 3], true), 100);
        let keep = crate::residency::manager::resident_groups(&g, Resident::Bytes(65));
        // 40 and 30 would be 70: the 30 is skipped for the 20.
        assert_eq!(keep, vec![2, 3]);
    }
}
