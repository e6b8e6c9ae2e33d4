//! The memory plot: SVG and PNG output of a synthetic run, refusals, and size with many samples.

use lowtide::plot::{draw, PlotInfo, HEIGHT, WIDTH};
use lowtide::residency::accounting::{PhaseRecord, Timeline};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A run of `seconds`: a text encoder loaded then dropped, a transformer streamed in blocks
/// (`per_second` changes a second) over the denoising steps, then the VAE.
fn synthetic(seconds: f64, per_second: usize) -> Timeline {
    let components = vec![
        "text_encoder".to_string(),
        "transformer".into(),
        "vae".into(),
    ];
    let phases = [
        ("text_encoder", 0.0, 0.15),
        ("transformer", 0.15, 0.85),
        ("vae", 0.85, 0.97),
        ("save", 0.97, 1.0),
    ];
    let at = |f: f64| f * seconds;
    let mut samples = vec![(at(0.0), 0, 0), (at(0.01), 0, 4 * GIB + 512 * MIB)];
    samples.push((at(0.15), 0, 0));
    let (start, end) = (at(0.15), at(0.85));
    let n = ((end - start) * per_second as f64) as usize;
    for i in 0..n {
        let t = start + (end - start) * i as f64 / n as f64;
        // A sawtooth of blocks coming and going, between 3 and 9 GiB.
        let bytes = 3 * GIB + (i as u64 % 24) * (GIB / 4);
        samples.push((t, 1, bytes));
    }
    samples.push((end, 1, 0));
    samples.push((at(0.85), 2, 160 * MIB));
    samples.push((at(0.97), 2, 0));
    let rss = (0..=200)
        .map(|i| {
            let t = at(i as f64 / 200.0);
            let weights = samples
                .iter()
                .filter(|s| s.0 <= t)
                .fold([0u64; 3], |mut cur, s| {
                    cur[s.1] = s.2;
                    cur
                })
                .iter()
                .sum::<u64>();
            (t, weights + GIB + (i as u64 % 7) * 64 * MIB)
        })
        .collect();
    let steps: Vec<f64> = (1..=20)
        .map(|i| start + (end - start) * i as f64 / 20.0)
        .collect();
    let transfers = (0..40)
        .map(|i| {
            let a = start + (end - start) * i as f64 / 40.0;
            (a, a + (end - start) / 100.0)
        })
        .chain([(at(0.0), at(0.01)), (at(0.84), at(0.86))])
        .collect();
    let stalls = (0..5)
        .map(|i| {
            let a = start + (end - start) * i as f64 / 5.0;
            (a, a + (end - start) / 200.0)
        })
        .collect();
    Timeline {
        components,
        samples,
        rss,
        phases: phases
            .iter()
            .map(|&(name, a, b)| PhaseRecord {
                name: name.into(),
                start: at(a),
                end: at(b),
                peak_resident_bytes: 9 * GIB,
                peak_rss_bytes: Some(11 * GIB),
                ..Default::default()
            })
            .collect(),
        steps,
        transfers,
        stalls,
    }
}

fn info() -> PlotInfo<'static> {
    PlotInfo {
        title: "flux-schnell 1024x1024, 20 steps",
        budget_bytes: Some(12 * GIB),
        predicted_peak_bytes: Some(10 * GIB + 300 * MIB),
    }
}

/// Every text of the SVG, joined.
fn svg_texts(svg: &str) -> String {
    let doc = roxmltree::Document::parse(svg).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn svg_is_xml_with_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.svg");
    draw(&synthetic(60.0, 50), &info(), &path).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    let texts = svg_texts(&svg);
    for want in [
        "text_encoder",
        "transformer",
        "vae",
        "budget 12 GiB",
        "predicted peak",
        "process RSS",
        "transfer",
        "stall",
        "flux-schnell",
    ] {
        assert!(
            texts.contains(want),
            "no `{want}` among the SVG's texts:\n{texts}"
        );
    }
    assert!(
        texts.lines().any(|l| l == "save"),
        "the phase `save` is not written:\n{texts}"
    );
    // Nothing but the plot beside it: the temporary file was renamed into place.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn png_decodes_to_the_plot_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.png");
    draw(&synthetic(60.0, 50), &info(), &path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
    assert_eq!((WIDTH, HEIGHT), (1200, 600));
    let first = *img.get_pixel(0, 0);
    let differing = img.pixels().filter(|p| **p != first).count();
    assert!(
        differing > (WIDTH * HEIGHT / 20) as usize,
        "only {differing} pixels differ from the corner"
    );
    // Text is drawn: some dark pixels in the title row.
    let dark = (0..WIDTH)
        .flat_map(|x| (0..36).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
        .count();
    assert!(dark > 50, "the title row has {dark} dark pixels");
    // Example for a person to look at, when asked for.
    if let Ok(out) = std::env::var("LOWTIDE_PLOT_EXAMPLE") {
        draw(&synthetic(60.0, 50), &info(), std::path::Path::new(&out)).unwrap();
    }
}

#[test]
fn other_extensions_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.txt");
    let err = draw(&synthetic(10.0, 10), &info(), &path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, lowtide::Error::InvalidArgument(_)), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(".svg") && msg.contains(".png"), "{msg}");
    assert!(!path.exists());
    let bare = dir.path().join("memory");
    assert!(draw(&synthetic(10.0, 10), &info(), &bare).is_err());
    // A folder that is not there: a write error naming the file.
    let nowhere = dir.path().join("missing").join("memory.svg");
    let msg = draw(&synthetic(10.0, 10), &info(), &nowhere)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&nowhere.display().to_string()), "{msg}");
}

#[test]
fn empty_timeline_still_draws() {
    let dir = tempfile::tempdir().unwrap();
    let empty = Timeline::default();
    let none = PlotInfo {
        title: "empty",
        budget_bytes: None,
        predicted_peak_bytes: None,
    };
    for name in ["empty.svg", "empty.png"] {
        draw(&empty, &none, &dir.path().join(name)).unwrap();
        draw(&empty, &info(), &dir.path().join(name)).unwrap();
    }
    svg_texts(&std::fs::read_to_string(dir.path().join("empty.svg")).unwrap());
    // Phases without RSS; a name that needs escaping in XML.
    let mut idle = synthetic(5.0, 10);
    idle.samples.clear();
    idle.rss.clear();
    idle.components[2] = "vae <fp16> & co".into();
    idle.samples.push((1.0, 2, 100 * MIB));
    draw(&idle, &none, &dir.path().join("idle.svg")).unwrap();
    let texts = svg_texts(&std::fs::read_to_string(dir.path().join("idle.svg")).unwrap());
    assert!(texts.contains("vae <fp16> & co"), "{texts}");
    // A sample for a component missing from the names is drawn under a made-up name.
    let mut unnamed = synthetic(5.0, 10);
    unnamed.components.truncate(1);
    draw(&unnamed, &info(), &dir.path().join("unnamed.svg")).unwrap();
}

#[test]
fn many_samples_make_a_small_svg() {
    let timeline = synthetic(200.0, 715);
    assert!(
        timeline.samples.len() >= 100_000,
        "{}",
        timeline.samples.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.svg");
    draw(&timeline, &info(), &path).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size < 2_000_000, "the SVG of 100k samples has {size} bytes");
    svg_texts(&std::fs::read_to_string(&path).unwrap());
}
