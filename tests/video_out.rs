//! Video output: MP4 files read back with the same crates that wrote them (mp4's reader, OpenH264's
//! decoder) and compared with the input frames; PNG frame folders; batches; an existing file
//! surviving a failure; output paths checked with errors naming the flag.

use std::io::{BufReader, Cursor};
use std::path::Path;

use candle_core::{Device, Tensor};
use lowtide::video::{check_fps, save_video, save_videos, video_output_path, VideoTarget};
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;

/// Error bounds, in 8-bit levels and PSNR dB over all pixels and channels, at the writer's
/// fixed quantiser (16), for the smooth moving gradient below. Two references:
/// - the ideal 4:2:0 frames (the input through BT.709 limited-range YUV 4:2:0 and back, written
///   here independently of the writer): the H.264 error alone, and a check of the colour matrix;
/// - the input itself: what a viewer gets, H.264 plus 4:2:0 chroma subsampling, which every
///   yuv420p video has.
///
/// Measured (48×32, 50×30, 51×31): vs ideal 42.5 / 41.4 / 42.3 dB, max 11 / 18 / 11 levels; vs
/// input 39.6 / 39.1 / 39.6 dB, max 15 / 19 / 14 (printed with `--nocapture`). On an 832×480,
/// 81-frame version: 44.7 dB, max 17 vs ideal; 42.3 dB, max 19 vs input. Max errors sit at
/// single 2×2 chroma blocks, so they get a wider margin than the PSNRs.
const MIN_PSNR_CODEC: f64 = 38.0;
const MAX_ERR_CODEC: u8 = 24;
const MIN_PSNR: f64 = 37.0;
const MAX_ERR: u8 = 28;

/// (T, H, W, 3) in [0, 1]: diagonal colour ramps that move a few pixels per frame, so frames
/// differ (P-frames carry real motion) while staying smooth like generated video.
fn moving_gradient(t: usize, h: usize, w: usize) -> Tensor {
    let mut v = Vec::with_capacity(t * h * w * 3);
    for f in 0..t {
        for y in 0..h {
            for x in 0..w {
                let (xf, yf, ff) = (x as f32, y as f32, f as f32);
                v.push((xf + 2.0 * ff) / (w + 2 * t) as f32);
                v.push((yf + ff) / (h as f32 + 20.0));
                v.push(0.5 + 0.4 * ((xf + yf) * 0.05 - ff * 0.3).sin());
            }
        }
    }
    Tensor::from_vec(v, (t, h, w, 3), &Device::Cpu).unwrap()
}

/// The 8-bit frames the PNG writer would write: `round(x * 255)`.
fn to_u8(frames: &Tensor) -> Vec<Vec<u8>> {
    let t = frames.dim(0).unwrap();
    (0..t)
        .map(|i| {
            frames
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect()
        })
        .collect()
}

/// What the container says, and the decoded frames as RGB at the coded (even) size.
struct Decoded {
    width: usize,
    height: usize,
    fps: f64,
    duration_s: f64,
    samples: u32,
    sync: Vec<bool>,
    top_level: Vec<String>,
    frames: Vec<Vec<u8>>,
}

/// Top-level box names in file order.
fn top_level_boxes(bytes: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0usize;
    while at + 8 <= bytes.len() {
        let mut size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as u64;
        if size == 1 {
            size = u64::from_be_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        }
        names.push(String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned());
        assert!(size >= 8, "box of size {size}");
        at += size as usize;
    }
    assert_eq!(at, bytes.len(), "boxes do not tile the file");
    names
}

/// Length-prefixed NAL units (MP4) to Annex B (start codes), as OpenH264's decoder reads.
fn annex_b(avcc: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= avcc.len() {
        let n = u32::from_be_bytes(avcc[at..at + 4].try_into().unwrap()) as usize;
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&avcc[at + 4..at + 4 + n]);
        at += 4 + n;
    }
    assert_eq!(at, avcc.len(), "sample is not length-prefixed NAL units");
    out
}

/// I420 BT.709 limited range to RGB, the inverse of what the writer declares in the SPS.
fn yuv_to_rgb(yuv: &impl YUVSource) -> Vec<u8> {
    let (w, h) = yuv.dimensions();
    let (sy, su, sv) = yuv.strides();
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let l = (yuv.y()[y * sy + x] as f32 - 16.0) / 219.0;
            let cb = (yuv.u()[(y / 2) * su + x / 2] as f32 - 128.0) / 224.0;
            let cr = (yuv.v()[(y / 2) * sv + x / 2] as f32 - 128.0) / 224.0;
            let r = l + 1.5748 * cr;
            let g = l - 0.1873 * cb - 0.4681 * cr;
            let b = l + 1.8556 * cb;
            for c in [r, g, b] {
                rgb.push((c * 255.0).round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    rgb
}

/// A decoded-frame-like YUV 4:2:0 image built in the test.
struct Planes {
    w: usize,
    h: usize,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl YUVSource for Planes {
    fn dimensions(&self) -> (usize, usize) {
        (self.w, self.h)
    }
    fn strides(&self) -> (usize, usize, usize) {
        (self.w, self.w / 2, self.w / 2)
    }
    fn y(&self) -> &[u8] {
        &self.y
    }
    fn u(&self) -> &[u8] {
        &self.u
    }
    fn v(&self) -> &[u8] {
        &self.v
    }
}

/// The ideal 4:2:0 version of an 8-bit RGB frame, back in RGB at the even coded size: BT.709
/// limited range, chroma the mean of each 2×2 block, odd sizes padded by repeating the edge.
fn ideal_420(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let (we, he) = (w + w % 2, h + h % 2);
    let px = |x: usize, y: usize, c: usize| {
        rgb[(y.min(h - 1) * w + x.min(w - 1)) * 3 + c] as f32 / 255.0
    };
    let (kr, kb) = (0.2126f32, 0.0722f32);
    let luma = |r: f32, g: f32, b: f32| kr * r + (1.0 - kr - kb) * g + kb * b;
    let q = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    let mut p = Planes {
        w: we,
        h: he,
        y: Vec::new(),
        u: Vec::new(),
        v: Vec::new(),
    };
    for y in 0..he {
        for x in 0..we {
            p.y.push(q(16.0 + 219.0 * luma(px(x, y, 0), px(x, y, 1), px(x, y, 2))));
        }
    }
    for cy in 0..he / 2 {
        for cx in 0..we / 2 {
            let mean = |c| {
                [(0, 0), (1, 0), (0, 1), (1, 1)]
                    .iter()
                    .map(|&(dx, dy)| px(2 * cx + dx, 2 * cy + dy, c))
                    .sum::<f32>()
                    / 4.0
            };
            let (r, g, b) = (mean(0), mean(1), mean(2));
            let l = luma(r, g, b);
            p.u.push(q(128.0 + 224.0 * (b - l) / (2.0 * (1.0 - kb))));
            p.v.push(q(128.0 + 224.0 * (r - l) / (2.0 * (1.0 - kr))));
        }
    }
    yuv_to_rgb(&p)
}

fn decode(path: &Path) -> Decoded {
    let bytes = std::fs::read(path).unwrap();
    let top_level = top_level_boxes(&bytes);
    let mut reader =
        mp4::Mp4Reader::read_header(BufReader::new(Cursor::new(&bytes)), bytes.len() as u64)
            .unwrap();
    assert_eq!(reader.tracks().len(), 1);
    let track = &reader.tracks()[&1];
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    let (width, height) = (track.width() as usize, track.height() as usize);
    let fps = track.frame_rate();
    let duration_s = track.duration().as_secs_f64();
    let samples = track.sample_count();
    let mut stream = Vec::new();
    for ps in [
        track.sequence_parameter_set().unwrap(),
        track.picture_parameter_set().unwrap(),
    ] {
        stream.extend_from_slice(&[0, 0, 0, 1]);
        stream.extend_from_slice(ps);
    }
    let mut decoder = Decoder::new().unwrap();
    assert!(decoder.decode(&stream).unwrap().is_none());
    let mut frames = Vec::new();
    let mut sync = Vec::new();
    for id in 1..=samples {
        let sample = reader.read_sample(1, id).unwrap().unwrap();
        sync.push(sample.is_sync);
        if let Some(yuv) = decoder.decode(&annex_b(&sample.bytes)).unwrap() {
            assert_eq!(yuv.dimensions(), (width, height));
            frames.push(yuv_to_rgb(&yuv));
        }
    }
    for yuv in decoder.flush_remaining().unwrap() {
        frames.push(yuv_to_rgb(&yuv));
    }
    Decoded {
        width,
        height,
        fps,
        duration_s,
        samples,
        sync,
        top_level,
        frames,
    }
}

/// PSNR (dB) and max abs error of the decoded frames' top-left (w, h) region against `expected`
/// (frames of width `w`).
fn compare(dec: &Decoded, expected: &[Vec<u8>], w: usize, h: usize) -> (f64, u8) {
    assert_eq!(dec.frames.len(), expected.len());
    let (mut se, mut n, mut max) = (0f64, 0usize, 0u8);
    for (got, want) in dec.frames.iter().zip(expected) {
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let g = got[(y * dec.width + x) * 3 + c];
                    let e = want[(y * w + x) * 3 + c];
                    let d = g.abs_diff(e);
                    max = max.max(d);
                    se += (d as f64).powi(2);
                    n += 1;
                }
            }
        }
    }
    let psnr = 10.0 * (255f64.powi(2) / (se / n as f64)).log10();
    (psnr, max)
}

#[track_caller]
fn round_trip(t: usize, h: usize, w: usize, fps: u32) -> Decoded {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("v.mp4");
    let video = moving_gradient(t, h, w);
    let paths = save_video(&video, fps, &out).unwrap();
    assert_eq!(paths, vec![out.clone()]);
    let dec = decode(&out);
    assert_eq!(dec.top_level, ["ftyp", "moov", "mdat"], "faststart layout");
    assert_eq!((dec.width, dec.height), (w + w % 2, h + h % 2));
    assert_eq!(dec.samples as usize, t);
    assert_eq!(dec.frames.len(), t);
    assert!((dec.fps - fps as f64).abs() < 1e-9, "fps {}", dec.fps);
    let want = t as f64 / fps as f64;
    assert!((dec.duration_s - want).abs() < 1e-6, "{} s", dec.duration_s);
    assert!(dec.sync[0], "the first frame must be a keyframe");
    let input = to_u8(&video);
    let ideal: Vec<Vec<u8>> = input.iter().map(|f| ideal_420(f, w, h)).collect();
    let (we, he) = (dec.width, dec.height);
    let (psnr_codec, max_codec) = compare(&dec, &ideal, we, he);
    let (psnr, max) = compare(&dec, &input, w, h);
    println!(
        "{w}x{h}, {t} frames @ {fps} fps: {} bytes; vs ideal 4:2:0 {psnr_codec:.2} dB, max \
         {max_codec}; vs input {psnr:.2} dB, max {max}",
        std::fs::metadata(&out).unwrap().len()
    );
    assert!(
        psnr_codec >= MIN_PSNR_CODEC,
        "PSNR vs ideal {psnr_codec:.2} dB"
    );
    assert!(max_codec <= MAX_ERR_CODEC, "max error vs ideal {max_codec}");
    assert!(psnr >= MIN_PSNR, "PSNR {psnr:.2} dB");
    assert!(max <= MAX_ERR, "max error {max}");
    dec
}

#[test]
fn mp4_round_trip_macroblock_aligned() {
    round_trip(9, 32, 48, 16);
}

#[test]
fn mp4_round_trip_size_not_a_multiple_of_16() {
    round_trip(9, 30, 50, 16);
}

#[test]
fn mp4_odd_size_is_padded_by_repeating_the_edge() {
    let (t, h, w) = (9, 31, 51);
    let dec = round_trip(t, h, w, 8);
    // The padded last column and row repeat the column and row before them.
    let cw = dec.width;
    for f in &dec.frames {
        for y in 0..h {
            for c in 0..3 {
                let last = f[(y * cw + w - 1) * 3 + c];
                let pad = f[(y * cw + w) * 3 + c];
                assert!(
                    last.abs_diff(pad) <= MAX_ERR_CODEC,
                    "column pad {last} vs {pad}"
                );
            }
        }
        for x in 0..w {
            for c in 0..3 {
                let last = f[((h - 1) * cw + x) * 3 + c];
                let pad = f[(h * cw + x) * 3 + c];
                assert!(
                    last.abs_diff(pad) <= MAX_ERR_CODEC,
                    "row pad {last} vs {pad}"
                );
            }
        }
    }
}

#[test]
fn mp4_has_a_keyframe_every_second_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let video = moving_gradient(20, 16, 16);
    let (a, b) = (tmp.path().join("a.mp4"), tmp.path().join("b.mp4"));
    save_video(&video, 8, &a).unwrap();
    save_video(&video, 8, &b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let dec = decode(&a);
    let keys: Vec<usize> = (0..20).filter(|&i| dec.sync[i]).collect();
    assert_eq!(keys, [0, 8, 16]);
}

#[test]
fn batches_of_mp4s_are_numbered_like_images() {
    let tmp = tempfile::tempdir().unwrap();
    let one = moving_gradient(3, 16, 16);
    let two = Tensor::stack(&[&one, &(1.0 - &one).unwrap()], 0).unwrap();
    let out = tmp.path().join("clip.mp4");
    let paths = save_videos(&two, 16, &out).unwrap();
    assert_eq!(
        paths,
        vec![tmp.path().join("clip-0.mp4"), tmp.path().join("clip-1.mp4")]
    );
    for (p, v) in paths.iter().zip([&one, &(1.0 - &one).unwrap()]) {
        // Each file holds its own video (the second is the negative of the first).
        let dec = decode(p);
        let ideal: Vec<Vec<u8>> = to_u8(v).iter().map(|f| ideal_420(f, 16, 16)).collect();
        let (psnr, max) = compare(&dec, &ideal, 16, 16);
        assert!(
            psnr >= MIN_PSNR_CODEC && max <= MAX_ERR_CODEC,
            "{psnr} {max}"
        );
    }
    assert!(!out.exists());
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn read_png(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

#[test]
fn a_folder_gets_numbered_pngs_equal_to_the_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let video = moving_gradient(9, 30, 50);
    let out = tmp.path().join("frames");
    let paths = save_video(&video, 16, &out).unwrap();
    let want: Vec<String> = (0..9).map(|i| format!("frame_{i:04}.png")).collect();
    assert_eq!(names(&out), want);
    assert_eq!(paths.len(), 9);
    for (p, frame) in paths.iter().zip(to_u8(&video)) {
        let img = image::open(p).unwrap();
        assert_eq!((img.width(), img.height()), (50, 30));
        assert_eq!(img.to_rgb8().into_raw(), frame, "{}", p.display());
    }
    // No temporary folder is left beside it.
    assert_eq!(names(tmp.path()), ["frames"]);

    // An existing folder: frames are replaced in place, other files are kept.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let darker = (&video * 0.5).unwrap();
    save_video(&darker, 16, &out).unwrap();
    assert_eq!(read_png(&out.join("frame_0003.png")), to_u8(&darker)[3]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(names(&out).len(), 10);
}

#[test]
fn a_batch_into_a_folder_gets_one_subfolder_per_video() {
    let tmp = tempfile::tempdir().unwrap();
    let one = moving_gradient(2, 8, 8);
    let two = Tensor::stack(&[&one, &(1.0 - &one).unwrap()], 0).unwrap();
    // A new folder, given with a trailing slash.
    let out = tmp.path().join("batch");
    save_videos(&two, 16, &tmp.path().join("batch/")).unwrap();
    assert_eq!(names(&out), ["0", "1"]);
    assert_eq!(names(&out.join("1")), ["frame_0000.png", "frame_0001.png"]);
    assert_eq!(
        read_png(&out.join("1/frame_0001.png")),
        to_u8(&(1.0 - &one).unwrap())[1]
    );
    assert_eq!(names(tmp.path()), ["batch"]);
    // Into the existing folder again.
    save_videos(&two, 16, &out).unwrap();
    assert_eq!(names(&out), ["0", "1"]);
}

#[test]
fn a_one_frame_result_can_be_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    let video = moving_gradient(1, 8, 12);
    let out = tmp.path().join("still.png");
    assert_eq!(
        video_output_path("--out", &out, 1).unwrap(),
        VideoTarget::Image
    );
    assert_eq!(save_video(&video, 16, &out).unwrap(), vec![out.clone()]);
    assert_eq!(read_png(&out), to_u8(&video)[0]);
}

#[test]
fn an_existing_file_survives_a_failure_and_no_temporary_file_is_left() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("keep.mp4");
    std::fs::write(&out, b"earlier video").unwrap();
    let bad_shapes = [
        Tensor::zeros((9, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((9, 16, 16, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((0, 16, 16, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    ];
    for bad in &bad_shapes {
        let err = save_video(bad, 16, &out).unwrap_err().to_string();
        assert!(
            err.contains("(T, H, W, 3)") || err.contains("(B, T, H, W, 3)"),
            "{err}"
        );
    }
    // Past the shape checks, the encoder refuses a frame wider than H.264 level 5.2 allows.
    let wide = Tensor::zeros((1, 2, 4000, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let wide = Tensor::cat(&[&wide, &wide], 0).unwrap();
    let err = save_video(&wide, 16, &out).unwrap_err().to_string();
    assert!(err.contains("keep.mp4") && err.contains("4000"), "{err}");
    // A bad frame rate.
    let ok = moving_gradient(2, 8, 8);
    let err = save_video(&ok, 0, &out).unwrap_err().to_string();
    assert!(err.contains("frame rate"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"earlier video");
    assert_eq!(names(tmp.path()), ["keep.mp4"]);

    // A frames folder that cannot be created (its parent is a file) leaves nothing behind.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    assert!(save_video(&ok, 16, &blocker.join("frames")).is_err());
    assert_eq!(names(tmp.path()), ["file", "keep.mp4"]);
}

#[test]
fn output_paths_are_checked_before_any_work_and_errors_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    assert_eq!(
        video_output_path("--out", &p("a.mp4"), 81).unwrap(),
        VideoTarget::Mp4
    );
    assert_eq!(
        video_output_path("--out", &p("a.MP4"), 81).unwrap(),
        VideoTarget::Mp4
    );
    // A folder: existing, new under an existing parent, or named with a trailing slash.
    assert_eq!(
        video_output_path("--out", tmp.path(), 81).unwrap(),
        VideoTarget::Frames
    );
    assert_eq!(
        video_output_path("--out", &p("frames"), 81).unwrap(),
        VideoTarget::Frames
    );
    assert_eq!(
        video_output_path("--out", &p("run.v2/"), 81).unwrap(),
        VideoTarget::Frames
    );
    let cases: [(&str, &[&str]); 5] = [
        ("a.gif", &["--out", "a.gif", ".gif", ".mp4", "folder"]),
        ("a.png", &["--out", "a.png", "81 frames", ".mp4", "folder"]),
        ("missing/a.mp4", &["--out", "missing", "does not exist"]),
        ("missing/frames", &["--out", "missing", "does not exist"]),
        ("plain", &["--out", "plain", "not a folder"]),
    ];
    std::fs::write(p("plain"), "x").unwrap();
    for (name, expect) in cases {
        let err = video_output_path("--out", &p(name), 81)
            .unwrap_err()
            .to_string();
        for e in expect {
            assert!(err.contains(e), "{name}: `{err}` lacks `{e}`");
        }
    }
    assert!(check_fps("--fps", 16).is_ok());
    for bad in [0, 241] {
        let err = check_fps("--fps", bad).unwrap_err().to_string();
        assert!(err.contains("--fps") && err.contains("240"), "{err}");
    }
    // Checking created nothing.
    assert_eq!(names(tmp.path()), ["plain"]);
}
