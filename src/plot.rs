//! Memory over a pipeline run as a picture (what `--report-plot` writes): the resident weight
//! bytes of each component as stacked step areas with the total as a line, the process RSS, the
//! phases as background bands, the budget and the predicted peak as horizontal lines, and the
//! denoising steps, weight transfers and stalls as strips under the chart, all labelled where
//! they are drawn (a legend box only for what has no room for a label of its own).
//!
//! The chart is drawn with `plotters` into an SVG string or an RGB buffer (encoded as PNG with
//! `image`) and written with [`crate::io::write_atomic`], so a failed draw leaves no partial file.
//! Text is measured, and in a PNG rasterized, with ab_glyph in Noto Sans embedded in the binary
//! (`ttf-noto-sans`): no system font is looked up and a PNG looks the same on every machine. An
//! SVG names Noto Sans, else the viewer's sans-serif, and labels leave room for a wider one.
//!
//! A timeline may hold ~100k samples: every series is first reduced to one value per pixel
//! column (for the stacked areas, the column's instant of highest total, so peaks survive), which
//! keeps the SVG small whatever the run's length.

use std::path::Path;
use std::sync::OnceLock;

use image::ImageEncoder;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::residency::accounting::Timeline;
use glyph_text::GlyphText;

/// The picture's size in pixels (SVG user units).
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 600;

/// What the plot shows beyond the timeline.
pub struct PlotInfo<'a> {
    /// The line at the top of the picture (model, resolution, steps...).
    pub title: &'a str,
    /// The memory budget of the run, drawn as a dashed red line.
    pub budget_bytes: Option<u64>,
    /// The planner's predicted peak, drawn as a dotted line.
    pub predicted_peak_bytes: Option<u64>,
}

/// Draws `timeline` to `path`: SVG when it ends in `.svg`, PNG when it ends in `.png`.
pub fn draw(timeline: &Timeline, info: &PlotInfo, path: &Path) -> Result<()> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let svg = match extension.as_deref() {
        Some("svg") => true,
        Some("png") => false,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "cannot draw a memory plot to {}: the file name must end in .svg or .png",
                path.display()
            )))
        }
    };
    let fail = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    if !font_registered() {
        return Err(fail(
            "the embedded font (Noto Sans) cannot be loaded".into(),
        ));
    }
    let bytes = if svg {
        let mut text = String::new();
        {
            let svg = SVGBackend::with_string(&mut text, (WIDTH, HEIGHT));
            let root = GlyphText::new(svg, false).into_drawing_area();
            render(&root, timeline, info)
                .and_then(|()| root.present())
                .map_err(|e| fail(format!("cannot draw the plot: {e}")))?;
        }
        text.into_bytes()
    } else {
        let mut rgb = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
        {
            let bitmap = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT));
            let root = GlyphText::new(bitmap, true).into_drawing_area();
            render(&root, timeline, info)
                .and_then(|()| root.present())
                .map_err(|e| fail(format!("cannot draw the plot: {e}")))?;
        }
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&rgb, WIDTH, HEIGHT, image::ExtendedColorType::Rgb8)
            .map_err(|e| fail(format!("cannot encode PNG: {e}")))?;
        png
    };
    crate::io::write_atomic(path, &bytes)
}

/// The font family every text of the plot names: the embedded font's (registered with plotters
/// under this name), which an SVG viewer uses where installed, else its `sans-serif`.
const FONT: &str = "Noto Sans, sans-serif";

/// Registers the embedded font once per process; false if it does not parse.
fn font_registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR).is_ok()
    })
}

type DrawResult<T, DB> =
    std::result::Result<T, DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;
type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

const TITLE_HEIGHT: u32 = 40;
/// The strips under the chart: three rows and the time axis.
const STRIP_HEIGHT: u32 = 100;
const STRIP_ROWS: [&str; 3] = ["steps", "transfer", "stall"];
const Y_LABEL_AREA: u32 = 72;
const MARGIN_LEFT: u32 = 8;
const MARGIN_RIGHT: u32 = 24;
/// Rows of phase names at the top of the chart, kept free of data.
const PHASE_ROW: i32 = 18;
const LABEL_SIZE: f64 = 16.0;

const TEXT: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(90, 90, 90);
const GRID: RGBColor = RGBColor(215, 218, 224);
const PHASE_FILL: [RGBColor; 2] = [RGBColor(230, 235, 243), RGBColor(243, 245, 249)];
const TOTAL_COLOR: RGBColor = RGBColor(35, 35, 35);
const RSS_COLOR: RGBColor = RGBColor(150, 0, 150);
const BUDGET_COLOR: RGBColor = RGBColor(214, 39, 40);
const PREDICTED_COLOR: RGBColor = RGBColor(70, 70, 70);
/// Dash and gap lengths, pixels: the budget dashed, the predicted peak dotted.
const BUDGET_DASH: (i32, i32) = (9, 6);
const PREDICTED_DASH: (i32, i32) = (2, 4);
const STEP_COLOR: RGBColor = RGBColor(60, 60, 60);
const TRANSFER_COLOR: RGBColor = RGBColor(31, 119, 180);
const STALL_COLOR: RGBColor = RGBColor(230, 85, 13);
const TRACK_COLOR: RGBColor = RGBColor(240, 241, 244);
/// Component colors (Tableau 10 without its red, kept for the budget, and its gray).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn pastel(c: RGBColor) -> RGBColor {
    let mix = |v: u8| (v as f64 * 0.5 + 255.0 * 0.5).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// `c` darkened, for text in a component's color on a light background.
fn darker(c: RGBColor) -> RGBColor {
    let dim = |v: u8| (v as f64 * 0.6).round() as u8;
    RGBColor(dim(c.0), dim(c.1), dim(c.2))
}

/// Text sizes are plotters' (an em of `size / 1.24` pixels).
fn font(size: f64, color: RGBColor) -> TextStyle<'static> {
    (FONT, size).into_font().color(&color)
}

/// Bytes in the plot's unit: GiB, or MiB when the largest value is under 1 GiB.
#[derive(Clone, Copy)]
struct Unit {
    name: &'static str,
    bytes: f64,
}

impl Unit {
    fn for_max(max: u64) -> Self {
        if max as f64 >= GIB {
            Unit {
                name: "GiB",
                bytes: GIB,
            }
        } else {
            Unit {
                name: "MiB",
                bytes: MIB,
            }
        }
    }

    fn of(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bytes
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

/// `bytes` for a label: "11.9 GiB", "8 GiB", "512 MiB".
fn fmt_bytes(bytes: u64) -> String {
    let unit = Unit::for_max(bytes);
    let v = unit.of(bytes);
    format!(
        "{} {}",
        fmt_number(v, if v >= 100.0 { 0 } else { 1 }),
        unit.name
    )
}

/// `v` with at most `decimals` decimals and no trailing zeros.
fn fmt_number(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

fn tick(v: &f64) -> String {
    fmt_number(*v, 2)
}

/// The time axis cut into one column per pixel of the plotting area.
struct Columns {
    t0: f64,
    dt: f64,
    n: usize,
}

impl Columns {
    /// The start of column `c` (`c == n`: the end of the axis).
    fn start(&self, c: usize) -> f64 {
        self.t0 + c as f64 * self.dt
    }

    fn of(&self, t: f64) -> usize {
        (((t - self.t0) / self.dt).floor().max(0.0) as usize).min(self.n - 1)
    }

    /// For each column, whether any of `periods` touches it.
    fn coverage(&self, periods: &[(f64, f64)]) -> Vec<bool> {
        let mut covered = vec![false; self.n];
        for &(a, b) in periods {
            if a.is_finite() && b.is_finite() && b >= a {
                covered[self.of(a)..=self.of(b)].fill(true);
            }
        }
        covered
    }
}

/// `[start, end)` runs of true columns.
fn runs(covered: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut c = 0;
    while c < covered.len() {
        if covered[c] {
            let start = c;
            while c < covered.len() && covered[c] {
                c += 1;
            }
            out.push((start, c));
        } else {
            c += 1;
        }
    }
    out
}

/// The points of a step function holding `values[c]` over column `c`, one horizontal segment per
/// run of equal values.
fn step_path(values: &[f64], cols: &Columns) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut a = 0;
    while a < values.len() {
        let v = values[a];
        let mut b = a + 1;
        while b < values.len() && values[b] == v {
            b += 1;
        }
        points.push((cols.start(a), v));
        points.push((cols.start(b), v));
        a = b;
    }
    points
}

/// The timeline's samples with finite times, in time order.
fn sorted_samples(timeline: &Timeline) -> Vec<(f64, usize, u64)> {
    let mut samples: Vec<_> = timeline
        .samples
        .iter()
        .copied()
        .filter(|s| s.0.is_finite())
        .collect();
    samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    samples
}

/// The highest total of the component step functions.
fn peak_total(samples: &[(f64, usize, u64)], components: usize) -> u64 {
    let mut current = vec![0u64; components];
    let (mut total, mut peak) = (0u64, 0u64);
    for &(_, c, bytes) in samples {
        total = total - current[c] + bytes;
        current[c] = bytes;
        peak = peak.max(total);
    }
    peak
}

/// For each component and column, its resident bytes at the instant of the column with the
/// highest total (the value at the column's start when nothing higher happens within it).
fn stack_columns(
    samples: &[(f64, usize, u64)],
    components: usize,
    cols: &Columns,
) -> Vec<Vec<u64>> {
    let mut snapshots: Vec<Vec<u64>> = Vec::with_capacity(cols.n);
    let mut current = vec![0u64; components];
    let mut total = 0u64;
    let mut i = 0;
    for c in 0..cols.n {
        let end = if c + 1 == cols.n {
            f64::INFINITY
        } else {
            cols.start(c + 1)
        };
        let mut snapshot = current.clone();
        let mut best = total;
        while i < samples.len() && samples[i].0 < end {
            let (_, k, bytes) = samples[i];
            total = total - current[k] + bytes;
            current[k] = bytes;
            if total > best {
                best = total;
                snapshot.copy_from_slice(&current);
            }
            i += 1;
        }
        snapshots.push(snapshot);
    }
    (0..components)
        .map(|k| snapshots.iter().map(|s| s[k]).collect())
        .collect()
}

/// The highest RSS sample in each column, with its time.
fn rss_columns(rss: &[(f64, u64)], cols: &Columns) -> Vec<Option<(f64, u64)>> {
    let mut out: Vec<Option<(f64, u64)>> = vec![None; cols.n];
    for &(t, bytes) in rss.iter().filter(|r| r.0.is_finite()) {
        let slot = &mut out[cols.of(t)];
        if slot.is_none_or(|(_, b)| bytes > b) {
            *slot = Some((t, bytes));
        }
    }
    out
}

/// The end of the time axis: the last time anything in the timeline happened (1 s when empty).
fn end_time(timeline: &Timeline) -> f64 {
    let times = timeline
        .samples
        .iter()
        .map(|s| s.0)
        .chain(timeline.rss.iter().map(|r| r.0))
        .chain(timeline.phases.iter().flat_map(|p| [p.start, p.end]))
        .chain(timeline.steps.iter().copied())
        .chain(
            timeline
                .transfers
                .iter()
                .chain(&timeline.stalls)
                .flat_map(|&(a, b)| [a, b]),
        );
    let end = times.filter(|t| t.is_finite()).fold(0.0, f64::max);
    if end > 0.0 {
        end
    } else {
        1.0
    }
}

/// A rectangle in backend pixels, `x1`, `y1` exclusive.
#[derive(Clone, Copy, Debug)]
struct Rect {
    x0: i32,
    y0: i32,
    x1: i32,
    y1: i32,
}

impl Rect {
    fn overlaps(&self, o: &Rect) -> bool {
        self.x0 < o.x1 && o.x0 < self.x1 && self.y0 < o.y1 && o.y0 < self.y1
    }
}

/// Where labels can still go: the plotting area less what is drawn or written on it.
struct Space {
    plot: Rect,
    /// Labels already placed.
    placed: Vec<Rect>,
    /// Pixel row of the top of the stacked areas in each column (labels other than the
    /// components' stay above it).
    stack_top: Vec<i32>,
    /// The lines, as their pixel row in each column they cover.
    lines: Vec<Vec<Option<i32>>>,
}

impl Space {
    /// Whether `r` is in the plotting area clear of placed labels and lines, and (unless
    /// `over_areas`) above the stacked areas.
    fn free(&self, r: &Rect, over_areas: bool) -> bool {
        let p = &self.plot;
        if r.x0 < p.x0 + 2 || r.x1 > p.x1 - 2 || r.y0 < p.y0 + 2 || r.y1 > p.y1 - 2 {
            return false;
        }
        if self.placed.iter().any(|q| q.overlaps(r)) {
            return false;
        }
        let (c0, c1) = ((r.x0 - p.x0) as usize, (r.x1 - p.x0) as usize);
        let c1 = c1.min(self.stack_top.len());
        if !over_areas && self.stack_top[c0..c1].iter().any(|&top| r.y1 + 2 > top) {
            return false;
        }
        // A line crosses the box if its rows between neighbouring columns reach into it.
        self.lines.iter().all(|line| {
            (c0..c1).all(|c| {
                let here = line[c];
                let before = if c > 0 { line[c - 1] } else { None }.or(here);
                match (before, here) {
                    (Some(a), Some(b)) => a.max(b) + 2 < r.y0 || a.min(b) - 2 >= r.y1,
                    _ => true,
                }
            })
        })
    }
}

/// What a legend entry shows beside its text.
enum Swatch {
    Fill(RGBColor),
    /// A line's color and dash (dash and gap lengths; no gap: solid).
    Line(RGBColor, (i32, i32)),
}

/// A line to label: its text, color and pixel rows.
struct LineLabel {
    text: String,
    color: RGBColor,
    rows: Vec<Option<i32>>,
    /// Place the label where the line is highest (else: from the right end leftwards).
    highest_first: bool,
    /// Dash and gap lengths of the line (no gap: solid).
    dash: (i32, i32),
    /// The label may go over the stacked areas (on a white box) when nowhere else is free.
    over_areas: bool,
}

fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    timeline: &Timeline,
    info: &PlotInfo,
) -> DrawResult<(), DB> {
    root.fill(&WHITE)?;
    let samples = sorted_samples(timeline);
    let n_components = samples
        .iter()
        .map(|s| s.1 + 1)
        .max()
        .unwrap_or(0)
        .max(timeline.components.len());
    let name = |k: usize| {
        timeline
            .components
            .get(k)
            .cloned()
            .unwrap_or_else(|| format!("component {k}"))
    };
    let peak = peak_total(&samples, n_components);
    let peak_rss = timeline
        .rss
        .iter()
        .filter(|r| r.0.is_finite())
        .map(|r| r.1)
        .max();
    let data_max = [
        Some(peak),
        peak_rss,
        info.budget_bytes,
        info.predicted_peak_bytes,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0);
    let unit = Unit::for_max(data_max);
    let (t0, t1) = (0.0, end_time(timeline));

    // Title, and the peaks on the right of the same line.
    root.draw(&Text::new(
        info.title.to_string(),
        ((MARGIN_LEFT + 8) as i32, 10),
        font(20.0, TEXT).pos(Pos::new(HPos::Left, VPos::Top)),
    ))?;
    let mut peaks = format!("peak resident weights {}", fmt_bytes(peak));
    if let Some(rss) = peak_rss {
        peaks += &format!(", peak RSS {}", fmt_bytes(rss));
    }
    root.draw(&Text::new(
        peaks,
        ((WIDTH - MARGIN_RIGHT) as i32, 14),
        font(14.0, MUTED).pos(Pos::new(HPos::Right, VPos::Top)),
    ))?;

    let (_, below_title) = root.split_vertically(TITLE_HEIGHT);
    let main_height = below_title.dim_in_pixel().1.saturating_sub(STRIP_HEIGHT);
    let (main_area, strip_area) = below_title.split_vertically(main_height);

    // The y axis leaves two rows at the top for the phase names.
    let plot_height = main_builder(&main_area)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?
        .plotting_area()
        .dim_in_pixel()
        .1
        .max(1) as f64;
    let headroom = (2 * PHASE_ROW + 8) as f64;
    let y_top = if data_max == 0 {
        1.0
    } else {
        unit.of(data_max) / (1.0 - (headroom / plot_height).min(0.5)) * 1.01
    };
    let mut chart = main_builder(&main_area).build_cartesian_2d(t0..t1, 0.0..y_top)?;
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let plot = Rect {
        x0: xs.start,
        y0: ys.start,
        x1: xs.end,
        y1: ys.end,
    };
    let cols = Columns {
        t0,
        dt: (t1 - t0) / (plot.x1 - plot.x0).max(1) as f64,
        n: (plot.x1 - plot.x0).max(1) as usize,
    };
    let coord = chart.as_coord_spec().clone();
    let row_of = |v: f64| coord.translate(&(t0, v)).1;
    let x_of = |t: f64| coord.translate(&(t, 0.0)).0;

    // Phases: background bands first, under the grid.
    chart.draw_series(timeline.phases.iter().enumerate().map(|(i, p)| {
        Rectangle::new([(p.start, 0.0), (p.end, y_top)], PHASE_FILL[i % 2].filled())
    }))?;
    chart
        .configure_mesh()
        .x_labels(10)
        .y_labels(8)
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID.stroke_width(1))
        .axis_style(MUTED.stroke_width(1))
        .y_label_formatter(&tick)
        .y_desc(format!("memory ({})", unit.name))
        .label_style(font(14.0, TEXT))
        .axis_desc_style(font(14.0, TEXT))
        .draw()?;

    // Components, stacked in their order, from the bottom.
    let stack = stack_columns(&samples, n_components, &cols);
    let mut lower = vec![0.0f64; cols.n];
    let mut bands = Vec::new();
    for (k, bytes) in stack.iter().enumerate() {
        let upper: Vec<f64> = lower
            .iter()
            .zip(bytes)
            .map(|(l, &b)| l + unit.of(b))
            .collect();
        if bytes.iter().any(|&b| b > 0) {
            let color = PALETTE[k % PALETTE.len()];
            let mut outline = step_path(&upper, &cols);
            let mut points = outline.clone();
            points.extend(step_path(&lower, &cols).into_iter().rev());
            chart.draw_series(std::iter::once(Polygon::new(
                points,
                pastel(color).filled(),
            )))?;
            // The band's top edge in its full color (the total line covers the topmost).
            outline.dedup();
            chart.draw_series(LineSeries::new(outline, color.stroke_width(1)))?;
            bands.push((k, lower.clone(), upper.clone()));
        }
        lower = upper;
    }
    let total = lower;
    chart.draw_series(LineSeries::new(
        step_path(&total, &cols),
        TOTAL_COLOR.stroke_width(2),
    ))?;

    // RSS: the highest sample of each column, joined.
    let rss = rss_columns(&timeline.rss, &cols);
    let rss_points: Vec<(f64, f64)> = rss
        .iter()
        .flatten()
        .map(|&(t, b)| (t, unit.of(b)))
        .collect();
    if !rss_points.is_empty() {
        chart.draw_series(LineSeries::new(
            rss_points.clone(),
            RSS_COLOR.stroke_width(2),
        ))?;
    }

    // Budget (dashed) and predicted peak (dotted).
    if let Some(b) = info.budget_bytes {
        let v = unit.of(b);
        chart.draw_series(DashedLineSeries::new(
            vec![(t0, v), (t1, v)],
            BUDGET_DASH.0,
            BUDGET_DASH.1,
            BUDGET_COLOR.stroke_width(2),
        ))?;
    }
    if let Some(p) = info.predicted_peak_bytes {
        let v = unit.of(p);
        chart.draw_series(DashedLineSeries::new(
            vec![(t0, v), (t1, v)],
            PREDICTED_DASH.0,
            PREDICTED_DASH.1,
            PREDICTED_COLOR.stroke_width(2),
        ))?;
    }

    // Labels, most constrained first: phase names, components, lines; a legend for the rest.
    let mut space = Space {
        plot,
        placed: Vec::new(),
        stack_top: total.iter().map(|&v| row_of(v)).collect(),
        lines: Vec::new(),
    };
    let mut legend: Vec<(Swatch, String)> = Vec::new();

    let phase_font = font(14.0, MUTED);
    let mut phase_rows: [Vec<Rect>; 2] = [Vec::new(), Vec::new()];
    for p in &timeline.phases {
        if !(p.start.is_finite() && p.end.is_finite()) {
            continue;
        }
        let (a, b) = (x_of(p.start).max(plot.x0), x_of(p.end).min(plot.x1));
        let centre = (a + b) / 2;
        let mut text = p.name.clone();
        let (w, _) = measure(root, &text, &phase_font)?;
        // Centred on its band; may spill over a neighbour's if that is free, in either row.
        let mut spot = None;
        for (row, taken) in phase_rows.iter().enumerate() {
            let x0 = (centre - w / 2).clamp(plot.x0 + 2, (plot.x1 - 2 - w).max(plot.x0 + 2));
            let r = Rect {
                x0: x0 - 3,
                y0: plot.y0 + 3 + row as i32 * PHASE_ROW,
                x1: x0 + w + 3,
                y1: plot.y0 + 3 + (row as i32 + 1) * PHASE_ROW,
            };
            if !taken.iter().any(|q| q.overlaps(&r)) {
                spot = Some((row, r));
                break;
            }
        }
        if spot.is_none() {
            // No room in either row: shorten the name to its band's width in the first row.
            let room = b - a - 6;
            while !text.is_empty() {
                text.pop();
                let (w, _) = measure(root, &format!("{text}…"), &phase_font)?;
                if (w) <= room {
                    break;
                }
            }
            if text.is_empty() {
                continue;
            }
            text.push('…');
            let (w, _) = measure(root, &text, &phase_font)?;
            let x0 = centre - w / 2;
            let r = Rect {
                x0: x0 - 3,
                y0: plot.y0 + 3,
                x1: x0 + w + 3,
                y1: plot.y0 + 3 + PHASE_ROW,
            };
            if phase_rows[0].iter().any(|q| q.overlaps(&r)) {
                continue;
            }
            spot = Some((0, r));
        }
        let (row, r) = spot.expect("set above");
        root.draw(&Text::new(
            text,
            (r.x0 + 3, r.y0 + 2),
            phase_font.pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
        phase_rows[row].push(r);
        space.placed.push(r);
    }

    let flat = |v: f64| vec![Some(row_of(v)); cols.n];
    let mut line_labels = Vec::new();
    if let Some(b) = info.budget_bytes {
        line_labels.push(LineLabel {
            text: format!("budget {}", fmt_bytes(b)),
            color: BUDGET_COLOR,
            rows: flat(unit.of(b)),
            highest_first: false,
            dash: BUDGET_DASH,
            over_areas: true,
        });
    }
    if let Some(p) = info.predicted_peak_bytes {
        line_labels.push(LineLabel {
            text: format!("predicted peak {}", fmt_bytes(p)),
            color: PREDICTED_COLOR,
            rows: flat(unit.of(p)),
            highest_first: false,
            dash: PREDICTED_DASH,
            over_areas: true,
        });
    }
    if !rss_points.is_empty() {
        line_labels.push(LineLabel {
            text: "process RSS".into(),
            color: RSS_COLOR,
            rows: interpolated_rows(
                &rss.iter()
                    .map(|r| r.map(|(_, b)| unit.of(b)))
                    .collect::<Vec<_>>(),
                &row_of,
            ),
            highest_first: true,
            dash: (1, 0),
            over_areas: false,
        });
    }
    if peak > 0 {
        line_labels.push(LineLabel {
            text: "total weights".into(),
            color: TOTAL_COLOR,
            rows: total.iter().map(|&v| Some(row_of(v))).collect(),
            highest_first: true,
            dash: (1, 0),
            over_areas: false,
        });
    }
    space.lines = line_labels.iter().map(|l| l.rows.clone()).collect();

    // Each component inside its band where it is widest, else just above it, else in a legend.
    let label_font = font(LABEL_SIZE, TEXT);
    for (k, lower, upper) in &bands {
        let color = PALETTE[k % PALETTE.len()];
        let peak_k = stack[*k].iter().copied().max().unwrap_or(0);
        let texts = [format!("{} {}", name(*k), fmt_bytes(peak_k)), name(*k)];
        let mut placed = false;
        for text in &texts {
            let (w, h) = measure(root, text, &label_font)?;
            if let Some((x, y)) = inside_band(lower, upper, w + 10, h + 6, &row_of) {
                let x = plot.x0 + x;
                root.draw(&Text::new(
                    text.clone(),
                    (x, y),
                    label_font.pos(Pos::new(HPos::Center, VPos::Center)),
                ))?;
                space.placed.push(Rect {
                    x0: x - w / 2 - 2,
                    y0: y - h / 2 - 2,
                    x1: x + w / 2 + 2,
                    y1: y + h / 2 + 2,
                });
                placed = true;
                break;
            }
        }
        if placed {
            continue;
        }
        let top_edge: Vec<Option<i32>> = lower
            .iter()
            .zip(upper)
            .map(|(&l, &u)| (u > l).then(|| row_of(u)))
            .collect();
        let style = font(LABEL_SIZE, darker(color));
        for text in &texts {
            let (w, h) = measure(root, text, &style)?;
            if let Some(r) = place_by_line(&space, &top_edge, (w + 4, h + 4), true, false) {
                root.draw(&Text::new(
                    text.clone(),
                    (r.x0 + 2, r.y0 + 2),
                    style.pos(Pos::new(HPos::Left, VPos::Top)),
                ))?;
                space.placed.push(r);
                placed = true;
                break;
            }
        }
        if !placed {
            legend.push((Swatch::Fill(color), name(*k)));
        }
    }

    for line in &line_labels {
        let style = font(LABEL_SIZE, line.color);
        let (w, h) = measure(root, &line.text, &style)?;
        let size = (w + 4, h + 4);
        let spot = place_by_line(&space, &line.rows, size, line.highest_first, false)
            .map(|r| (r, false))
            .or_else(|| {
                line.over_areas
                    .then(|| place_by_line(&space, &line.rows, size, line.highest_first, true))
                    .flatten()
                    .map(|r| (r, true))
            });
        match spot {
            Some((r, boxed)) => {
                if boxed {
                    root.draw(&Rectangle::new(
                        [(r.x0, r.y0), (r.x1, r.y1)],
                        WHITE.mix(0.85).filled(),
                    ))?;
                }
                root.draw(&Text::new(
                    line.text.clone(),
                    (r.x0 + 2, r.y0 + 2),
                    style.pos(Pos::new(HPos::Left, VPos::Top)),
                ))?;
                space.placed.push(r);
            }
            None => legend.push((Swatch::Line(line.color, line.dash), line.text.clone())),
        }
    }
    if !legend.is_empty() {
        draw_legend(root, &space, &legend)?;
    }

    draw_strips(root, &strip_area, timeline, t0..t1, &cols)?;
    Ok(())
}

/// The room `text` takes: its measure in the embedded font, 10% wider for an SVG viewer that
/// sets it in a wider sans-serif (DejaVu Sans is about that much wider).
fn measure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    text: &str,
    style: &TextStyle,
) -> DrawResult<(i32, i32), DB> {
    let (w, h) = root.estimate_text_size(text, style)?;
    Ok(((w as f64 * 1.1).ceil() as i32, h as i32))
}

fn main_builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .margin_top(4)
        .margin_bottom(0)
        .x_label_area_size(0)
        .y_label_area_size(Y_LABEL_AREA);
    builder
}

/// Where a `w` × `h` label fits inside the band between `lower` and `upper` (values per column):
/// the column offset of its centre and its pixel row, at the band's widest point.
fn inside_band(
    lower: &[f64],
    upper: &[f64],
    w: i32,
    h: i32,
    row_of: &impl Fn(f64) -> i32,
) -> Option<(i32, i32)> {
    let n = lower.len();
    let w = w.max(1) as usize;
    if w > n {
        return None;
    }
    let top: Vec<i32> = upper.iter().map(|&v| row_of(v)).collect();
    let bottom: Vec<i32> = lower.iter().map(|&v| row_of(v)).collect();
    let mut best: Option<(i32, usize, i32, i32)> = None;
    for s in 0..=n - w {
        let inner_top = *top[s..s + w].iter().max().expect("w >= 1");
        let inner_bottom = *bottom[s..s + w].iter().min().expect("w >= 1");
        let room = inner_bottom - inner_top;
        if best.is_none_or(|b| room > b.0) {
            best = Some((room, s, inner_top, inner_bottom));
        }
    }
    let (room, s, a, b) = best?;
    (room >= h).then_some(((s + w / 2) as i32, (a + b) / 2))
}

/// The rows of a line known in some columns (`values`, in the plot's unit), joined linearly
/// between its first and last known column.
fn interpolated_rows(values: &[Option<f64>], row_of: &impl Fn(f64) -> i32) -> Vec<Option<i32>> {
    let known: Vec<(usize, i32)> = values
        .iter()
        .enumerate()
        .filter_map(|(c, v)| v.map(|v| (c, row_of(v))))
        .collect();
    let mut rows = vec![None; values.len()];
    if let Some(&(c, r)) = known.first() {
        rows[c] = Some(r);
    }
    for pair in known.windows(2) {
        let ((ca, ra), (cb, rb)) = (pair[0], pair[1]);
        for (c, row) in rows.iter_mut().enumerate().take(cb + 1).skip(ca) {
            let f = (c - ca) as f64 / (cb - ca) as f64;
            *row = Some((ra as f64 + f * (rb - ra) as f64).round() as i32);
        }
    }
    rows
}

/// A free spot for a label of `(w, h)` just above (or else just below) the line with `rows`
/// (see [`Space::free`] for `over_areas`).
fn place_by_line(
    space: &Space,
    rows: &[Option<i32>],
    (w, h): (i32, i32),
    highest_first: bool,
    over_areas: bool,
) -> Option<Rect> {
    let n = rows.len() as i32;
    let x0 = space.plot.x0;
    // Candidate left columns, from the right end leftwards every 8 px.
    let mut starts: Vec<i32> = (0..=(n - w - 6).max(-1))
        .rev()
        .step_by(8)
        .map(|s| s + 3)
        .collect();
    let span = |s: i32| -> Option<(i32, i32)> {
        let cells = rows.get(s as usize..(s + w) as usize)?;
        let mut range: Option<(i32, i32)> = None;
        for r in cells {
            let r = (*r)?;
            range = Some(range.map_or((r, r), |(a, b)| (a.min(r), b.max(r))));
        }
        range
    };
    if highest_first {
        // Where the line is flat first (a label there plainly belongs to it), highest first.
        starts.sort_by_key(|&s| {
            span(s).map_or((2, i32::MAX), |(top, bottom)| {
                (if bottom - top <= 3 { 0 } else { 1 }, top)
            })
        });
    }
    for above in [true, false] {
        for &s in &starts {
            let Some((top, bottom)) = span(s) else {
                continue;
            };
            let r = if above {
                Rect {
                    x0: x0 + s,
                    y0: top - 3 - h,
                    x1: x0 + s + w,
                    y1: top - 3,
                }
            } else {
                Rect {
                    x0: x0 + s,
                    y0: bottom + 4,
                    x1: x0 + s + w,
                    y1: bottom + 4 + h,
                }
            };
            if space.free(&r, over_areas) {
                return Some(r);
            }
        }
    }
    None
}

/// A boxed legend for what found no room for a label of its own, at the first free spot (from
/// the top left).
fn draw_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    space: &Space,
    entries: &[(Swatch, String)],
) -> DrawResult<(), DB> {
    let style = font(14.0, TEXT);
    let mut text_w = 0;
    for (_, text) in entries {
        text_w = text_w.max(measure(root, text, &style)?.0);
    }
    let (w, line_h) = (text_w + 40, 20);
    let h = entries.len() as i32 * line_h + 8;
    let p = &space.plot;
    // Above the areas if it can be, else over them, else at the top left whatever is there.
    let spot = |over_areas: bool| {
        (p.y0 + 2 * PHASE_ROW + 6..p.y1 - h)
            .step_by(6)
            .flat_map(|y| (p.x0 + 8..p.x1 - w).step_by(12).map(move |x| (x, y)))
            .find(|&(x, y)| {
                let r = Rect {
                    x0: x,
                    y0: y,
                    x1: x + w,
                    y1: y + h,
                };
                space.free(&r, over_areas)
            })
    };
    let (x, y) = spot(false)
        .or_else(|| spot(true))
        .unwrap_or((p.x0 + 8, p.y0 + 2 * PHASE_ROW + 6));
    root.draw(&Rectangle::new(
        [(x, y), (x + w, y + h)],
        WHITE.mix(0.9).filled(),
    ))?;
    root.draw(&Rectangle::new(
        [(x, y), (x + w, y + h)],
        GRID.stroke_width(1),
    ))?;
    for (i, (swatch, text)) in entries.iter().enumerate() {
        let cy = y + 4 + i as i32 * line_h + line_h / 2;
        match swatch {
            Swatch::Fill(c) => {
                root.draw(&Rectangle::new(
                    [(x + 8, cy - 6), (x + 22, cy + 6)],
                    pastel(*c).filled(),
                ))?;
                root.draw(&Rectangle::new(
                    [(x + 8, cy - 6), (x + 22, cy + 6)],
                    c.stroke_width(1),
                ))?;
            }
            Swatch::Line(c, (dash, gap)) => {
                let mut x0 = x + 6;
                while x0 < x + 24 {
                    let x1 = if *gap == 0 {
                        x + 24
                    } else {
                        (x0 + dash).min(x + 24)
                    };
                    root.draw(&PathElement::new(
                        vec![(x0, cy), (x1, cy)],
                        c.stroke_width(2),
                    ))?;
                    x0 = x1 + gap;
                }
            }
        }
        root.draw(&Text::new(
            text.clone(),
            (x + 30, cy),
            style.pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// The strips under the chart, on its time axis: step ends as ticks, transfers and stalls as
/// bars, one row each, named on the left.
fn draw_strips<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    timeline: &Timeline,
    x_range: std::ops::Range<f64>,
    cols: &Columns,
) -> DrawResult<(), DB> {
    let mut chart: Chart<'_, DB> = ChartBuilder::on(area)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .margin_top(6)
        .margin_bottom(4)
        .x_label_area_size(40)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(x_range, 0.0..STRIP_ROWS.len() as f64)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_y_axis()
        .x_labels(10)
        .x_label_formatter(&tick)
        .x_desc("time (s)")
        .axis_style(MUTED.stroke_width(1))
        .label_style(font(14.0, TEXT))
        .axis_desc_style(font(14.0, TEXT))
        .draw()?;
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let row_h = (ys.end - ys.start) / STRIP_ROWS.len() as i32;
    let label = font(14.0, TEXT);
    let step_ticks: Vec<(f64, f64)> = timeline.steps.iter().map(|&t| (t, t)).collect();
    let rows = [
        (&step_ticks, STEP_COLOR),
        (&timeline.transfers, TRANSFER_COLOR),
        (&timeline.stalls, STALL_COLOR),
    ];
    for (i, (name, (periods, color))) in STRIP_ROWS.iter().zip(rows).enumerate() {
        let top = ys.start + i as i32 * row_h;
        let (y0, y1) = (top + 3, top + row_h - 3);
        root.draw(&Rectangle::new(
            [(xs.start, y0), (xs.end, y1)],
            TRACK_COLOR.filled(),
        ))?;
        for (a, b) in runs(&cols.coverage(periods)) {
            let (x0, x1) = (xs.start + a as i32, xs.start + b as i32);
            let (y0, y1) = if i == 0 {
                (top + 1, top + row_h - 1)
            } else {
                (y0, y1)
            };
            root.draw(&Rectangle::new([(x0, y0), (x1, y1)], color.filled()))?;
        }
        root.draw(&Text::new(
            name.to_string(),
            (xs.start - 8, top + row_h / 2),
            label.pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// The plot's text metrics and the PNG's text (see [`GlyphText`]), apart so that the backend
/// traits it implements do not shadow the style methods of the same names used above.
mod glyph_text {
    use ab_glyph::{Font, FontRef, PxScale, PxScaleFont, ScaleFont};
    use plotters::prelude::DrawingBackend;
    use plotters::style::text_anchor::{HPos, VPos};
    use plotters_backend::{
        BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
    };

    /// A backend whose text is measured, and for a bitmap also set, here with ab_glyph in the
    /// embedded font; everything else goes to the wrapped backend.
    ///
    /// Why not plotters' own ab_glyph text: it drops each glyph's side bearing (letters stand
    /// unevenly, "1 2 GiB"), rounds each glyph's height on its own (some sit a pixel low), and
    /// measures text at an em of `size / 1.36` while its SVG backend writes `size / 1.24`. Here
    /// the em is `size / 1.24` everywhere, so what is measured is what an SVG viewer shows (in
    /// Noto Sans) and what the PNG shows.
    pub(super) struct GlyphText<B> {
        inner: B,
        font: FontRef<'static>,
        /// Rasterize text here (a bitmap); else hand it to `inner` (SVG writes `<text>`).
        rasterize: bool,
    }

    impl<B> GlyphText<B> {
        pub(super) fn new(inner: B, rasterize: bool) -> Self {
            let font = FontRef::try_from_slice(ttf_noto_sans::REGULAR)
                .expect("registered (and so parsed) before drawing");
            GlyphText {
                inner,
                font,
                rasterize,
            }
        }
    }

    /// `font` scaled to an em of `size / 1.24` pixels, that em, and the glyphs of `text` with
    /// their pen positions and the text's width.
    #[allow(clippy::type_complexity)]
    fn layout<'f>(
        font: &'f FontRef<'static>,
        size: f64,
        text: &str,
    ) -> (
        PxScaleFont<&'f FontRef<'static>>,
        f32,
        Vec<(ab_glyph::GlyphId, f32)>,
        f32,
    ) {
        let em = size as f32 / 1.24;
        let units = font.units_per_em().unwrap_or(1000.0);
        let font = font.as_scaled(PxScale::from(em * font.height_unscaled() / units));
        let mut glyphs = Vec::new();
        let mut pen = 0.0f32;
        let mut previous = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = previous {
                pen += font.kern(p, id);
            }
            glyphs.push((id, pen));
            pen += font.h_advance(id);
            previous = Some(id);
        }
        (font, em, glyphs, pen)
    }

    type BackendResult<E> = std::result::Result<(), DrawingErrorKind<E>>;

    impl<B: DrawingBackend> DrawingBackend for GlyphText<B> {
        type ErrorType = B::ErrorType;

        fn get_size(&self) -> (u32, u32) {
            self.inner.get_size()
        }

        fn ensure_prepared(&mut self) -> BackendResult<B::ErrorType> {
            self.inner.ensure_prepared()
        }

        fn present(&mut self) -> BackendResult<B::ErrorType> {
            self.inner.present()
        }

        fn draw_pixel(
            &mut self,
            point: BackendCoord,
            color: BackendColor,
        ) -> BackendResult<B::ErrorType> {
            self.inner.draw_pixel(point, color)
        }

        fn draw_line<S: BackendStyle>(
            &mut self,
            from: BackendCoord,
            to: BackendCoord,
            style: &S,
        ) -> BackendResult<B::ErrorType> {
            self.inner.draw_line(from, to, style)
        }

        fn draw_rect<S: BackendStyle>(
            &mut self,
            upper_left: BackendCoord,
            bottom_right: BackendCoord,
            style: &S,
            fill: bool,
        ) -> BackendResult<B::ErrorType> {
            self.inner.draw_rect(upper_left, bottom_right, style, fill)
        }

        fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
            &mut self,
            path: I,
            style: &S,
        ) -> BackendResult<B::ErrorType> {
            self.inner.draw_path(path, style)
        }

        fn draw_circle<S: BackendStyle>(
            &mut self,
            center: BackendCoord,
            radius: u32,
            style: &S,
            fill: bool,
        ) -> BackendResult<B::ErrorType> {
            self.inner.draw_circle(center, radius, style, fill)
        }

        fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
            &mut self,
            vert: I,
            style: &S,
        ) -> BackendResult<B::ErrorType> {
            self.inner.fill_polygon(vert, style)
        }

        fn blit_bitmap(
            &mut self,
            pos: BackendCoord,
            size: (u32, u32),
            src: &[u8],
        ) -> BackendResult<B::ErrorType> {
            self.inner.blit_bitmap(pos, size, src)
        }

        /// The advances' width by the em.
        fn estimate_text_size<S: BackendTextStyle>(
            &self,
            text: &str,
            style: &S,
        ) -> std::result::Result<(u32, u32), DrawingErrorKind<B::ErrorType>> {
            let (_, em, _, width) = layout(&self.font, style.size(), text);
            Ok((width.ceil() as u32, em.ceil() as u32))
        }

        /// Text in the box `estimate_text_size` measures, anchored as plotters anchors it, with
        /// the capitals and descenders centred in it.
        fn draw_text<S: BackendTextStyle>(
            &mut self,
            text: &str,
            style: &S,
            pos: BackendCoord,
        ) -> BackendResult<B::ErrorType> {
            if !self.rasterize {
                return self.inner.draw_text(text, style, pos);
            }
            let color = style.color();
            if color.alpha == 0.0 {
                return Ok(());
            }
            let face = self.font.clone();
            let (font, em, glyphs, width) = layout(&face, style.size(), text);
            let cap = font
                .outline_glyph(font.scaled_glyph('H'))
                .map_or(font.ascent() * 0.7, |g| -g.px_bounds().min.y);
            let baseline = em / 2.0 + (cap + font.descent()) / 2.0;
            let dx = match style.anchor().h_pos {
                HPos::Left => 0.0,
                HPos::Center => -width / 2.0,
                HPos::Right => -width,
            };
            let dy = match style.anchor().v_pos {
                VPos::Top => 0.0,
                VPos::Center => -em / 2.0,
                VPos::Bottom => -em,
            };
            let transform = style.transform();
            let (w, h) = self.inner.get_size();
            for (id, x) in glyphs {
                let glyph = id
                    .with_scale_and_position(font.scale(), ab_glyph::point(x + dx, baseline + dy));
                let Some(outline) = font.outline_glyph(glyph) else {
                    continue;
                };
                let min = outline.px_bounds().min;
                let mut result = Ok(());
                outline.draw(|gx, gy, coverage| {
                    let (x, y) =
                        transform.transform(min.x as i32 + gx as i32, min.y as i32 + gy as i32);
                    let (x, y) = (pos.0 + x, pos.1 + y);
                    let inside = x >= 0 && y >= 0 && x < w as i32 && y < h as i32;
                    if result.is_ok() && coverage > 0.0 && inside {
                        let alpha = color.alpha * coverage.min(1.0) as f64;
                        result = self.inner.draw_pixel(
                            (x, y),
                            BackendColor {
                                alpha,
                                rgb: color.rgb,
                            },
                        );
                    }
                });
                result?;
            }
            Ok(())
        }
    }
}
