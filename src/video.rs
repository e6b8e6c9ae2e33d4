//! Video out: frames (T, H, W, 3) in [0, 1] as an H.264 MP4 file or as a folder of numbered PNGs.
//!
//! The MP4 is encoded in memory (OpenH264, built from its bundled source) and muxed with the `mp4`
//! crate's boxes, then handed to the one output writer [`write_atomic`]; nothing shells out to
//! ffmpeg. The file is what browsers and ffmpeg expect of a web video: H.264 Constrained Baseline,
//! yuv420p tagged BT.709 limited range, one sample per frame at a constant frame rate, and the
//! `moov` index before the `mdat` data ("faststart"), so playback starts before the download ends.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use image::ImageEncoder;
use mp4::{
    AvcConfig, FixedPointU8, FourCC, MediaConfig, Mp4Box, Mp4Config, Mp4Reader, Mp4Sample,
    Mp4Writer, TrackConfig, TrackType, WriteBox,
};
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile,
    QpRange, RateControlMode, SpsPpsStrategy, VuiConfig,
};
use openh264::formats::YUVBuffer;
use openh264::{OpenH264API, Timestamp};

use crate::error::{Error, Result};
use crate::io::{image_paths, save_images, write_atomic};

/// Frame rate used when none is given (Wan's `export_to_video(..., fps=16)`).
pub const DEFAULT_FPS: u32 = 16;
/// Highest accepted frame rate: far above any video model's, and it keeps the track's time
/// scale (`fps * TICKS_PER_FRAME`) well inside a `u32`.
pub const MAX_FPS: u32 = 240;

/// H.264 quantiser, the same for every frame. At 16 the codec's own error is about 40–45 dB PSNR
/// on top of what 4:2:0 chroma subsampling loses (tests/video_out.rs measures it), finer than
/// diffusers' `export_to_video` (libx264 at about CRF 25), at 0.2 (smooth) to 2 (strong synthetic
/// texture) bits per pixel. OpenH264 does not go below 12.
const QP: u8 = 16;
/// Track time units per frame: the track time scale is `fps * TICKS_PER_FRAME`, so every frame
/// lasts exactly `TICKS_PER_FRAME` units (no rounding drift) and the scale is ≥ 1000 as players
/// prefer.
const TICKS_PER_FRAME: u32 = 1000;

/// What an output path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoTarget {
    /// `x.mp4`: an H.264 MP4 per video.
    Mp4,
    /// A folder (existing, ending in `/`, or a name without an extension): numbered PNG frames.
    Frames,
    /// `x.png`, only for a one-frame result: that frame as an image.
    Image,
}

/// The kind of output `path` names, or an error (naming `flag`) for an extension lowtide cannot
/// write a video as. `frames` is the number of frames per video.
fn target(flag: &str, path: &Path, frames: usize) -> Result<VideoTarget> {
    let bad =
        |reason: String| Error::InvalidArgument(format!("{flag} {}: {reason}", path.display()));
    let trailing_slash = path.as_os_str().to_string_lossy().ends_with(['/', '\\']);
    if trailing_slash || path.is_dir() {
        return Ok(VideoTarget::Frames);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        None => Ok(VideoTarget::Frames),
        Some("mp4") => Ok(VideoTarget::Mp4),
        Some("png") if frames == 1 => Ok(VideoTarget::Image),
        Some("png") => Err(bad(format!(
            "the result is a video of {frames} frames; give a .mp4 file, or a folder for \
             numbered PNG frames"
        ))),
        Some(e) => Err(bad(format!(
            "lowtide cannot write .{e} videos; give a .mp4 file, or a folder (a name without an \
             extension, or ending in /) for numbered PNG frames"
        ))),
    }
}

/// Checks a video output path before any model work, as [`crate::validate::output_path`] does
/// for images: a `.mp4` file in an existing, writable folder; or a folder for PNG frames that
/// exists, or whose parent exists, and is writable; or, for a one-frame result only, a `.png`.
/// Any other extension, or `.png` for several frames, is an error naming `flag`.
pub fn video_output_path(flag: &str, path: &Path, frames: usize) -> Result<VideoTarget> {
    let kind = target(flag, path, frames)?;
    match kind {
        VideoTarget::Mp4 => crate::validate::output_path(flag, path, &["mp4"])?,
        VideoTarget::Image => crate::validate::output_path(flag, path, &["png"])?,
        VideoTarget::Frames => {
            let bad = |reason: String| {
                Error::InvalidArgument(format!("{flag} {}: {reason}", path.display()))
            };
            if path.exists() && !path.is_dir() {
                return Err(bad(
                    "exists and is not a folder; give a folder for PNG frames or a .mp4 file"
                        .into(),
                ));
            }
            let dir = if path.is_dir() {
                path
            } else {
                match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                }
            };
            if !dir.is_dir() {
                return Err(bad(format!(
                    "the folder {} does not exist; create it first",
                    dir.display()
                )));
            }
            // Frames are staged in a temporary folder beside the target (or written as temporary
            // files inside it) and renamed into place: probe that it can be written.
            let probe = dir.join(format!(".lowtide-probe-{}", std::process::id()));
            if let Err(e) = std::fs::File::create(&probe) {
                return Err(bad(format!("cannot write into {}: {e}", dir.display())));
            }
            let _ = std::fs::remove_file(&probe);
        }
    }
    Ok(kind)
}

/// A frame rate in `1..=MAX_FPS`, else an error naming `flag`.
pub fn check_fps(flag: &str, fps: u32) -> Result<u32> {
    if fps == 0 || fps > MAX_FPS {
        return Err(Error::InvalidArgument(format!(
            "{flag} {fps}: the frame rate must be between 1 and {MAX_FPS}"
        )));
    }
    Ok(fps)
}

/// Writes one video, (T, H, W, 3) in [0, 1]; see [`save_videos`].
pub fn save_video(frames: &Tensor, fps: u32, out: &Path) -> Result<Vec<PathBuf>> {
    if frames.rank() != 4 {
        return Err(Error::InvalidArgument(format!(
            "a video must be a (T, H, W, 3) tensor; got shape {:?}",
            frames.dims()
        )));
    }
    save_videos(&frames.unsqueeze(0)?, fps, out)
}

/// Writes a batch of videos, (B, T, H, W, 3) in [0, 1], and returns the paths written:
/// - `out.mp4`: `out.mp4` for one video; `out-0.mp4`, `out-1.mp4`, … for several (as
///   [`image_paths`]);
/// - a folder `out`: `out/frame_0000.png`, `out/frame_0001.png`, … for one video;
///   `out/0/frame_0000.png`, `out/1/…`, … for several, so the folder named holds everything.
///   PNGs are 8-bit `round(x * 255)`, as [`save_images`]. A new folder is built under a temporary
///   name and renamed into place, so a failure leaves none; in an existing folder each frame
///   replaces its namesake atomically (frames numbered beyond this video's are left alone);
/// - `out.png`, only when T = 1: the frame as an image, through [`save_images`].
///
/// Odd widths and heights are padded to even ones (H.264 4:2:0 needs even sizes and cannot
/// signal an odd crop) by repeating the last column or row, so no input pixel is lost; diffusers'
/// `export_to_video` instead rescales to a multiple of 16 with a warning.
pub fn save_videos(videos: &Tensor, fps: u32, out: &Path) -> Result<Vec<PathBuf>> {
    if videos.rank() != 5 || videos.dim(4)? != 3 || videos.dims().contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "videos must be a (B, T, H, W, 3) tensor with no empty dimension; got shape {:?}",
            videos.dims()
        )));
    }
    let (b, t, _, _, _) = videos.dims5()?;
    check_fps("fps", fps)?;
    match target("the output", out, t)? {
        VideoTarget::Image => save_images(&videos.i((.., 0))?, out),
        VideoTarget::Mp4 => {
            let paths = image_paths(out, b);
            for (i, p) in paths.iter().enumerate() {
                let bytes = encode_mp4(&videos.get(i)?, fps).map_err(|reason| Error::Write {
                    path: p.clone(),
                    reason,
                })?;
                write_atomic(p, &bytes)?;
            }
            Ok(paths)
        }
        VideoTarget::Frames => {
            // Every frame of every video is encoded before anything is written.
            let mut pngs = Vec::with_capacity(b);
            for i in 0..b {
                pngs.push(encode_pngs(&videos.get(i)?, out)?);
            }
            let sub = |i: usize| {
                if b == 1 {
                    PathBuf::new()
                } else {
                    PathBuf::from(i.to_string())
                }
            };
            let paths = (0..b)
                .flat_map(|i| (0..t).map(move |j| (i, j)))
                .map(|(i, j)| out.join(sub(i)).join(frame_name(j)))
                .collect();
            if out.is_dir() && b > 1 {
                // Each video's subfolder on its own: a new one appears whole, an existing one is
                // updated file by file.
                for (i, files) in pngs.into_iter().enumerate() {
                    write_folder(&out.join(sub(i)), files)?;
                }
            } else {
                let files = pngs.into_iter().enumerate().flat_map(|(i, files)| {
                    files
                        .into_iter()
                        .map(move |(name, png)| (sub(i).join(name), png))
                });
                write_folder(out, files)?;
            }
            Ok(paths)
        }
    }
}

/// The name of frame `i` in a frames folder.
fn frame_name(i: usize) -> String {
    format!("frame_{i:04}.png")
}

/// One video (T, H, W, 3) as 8-bit PNGs in memory, with their file names.
fn encode_pngs(frames: &Tensor, out: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let (t, h, w, _) = frames.dims4()?;
    let mut pngs = Vec::with_capacity(t);
    for i in 0..t {
        let px: Vec<u8> = frame_f32(frames, i)?
            .into_iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(&px, w as u32, h as u32, image::ExtendedColorType::Rgb8)
            .map_err(|e| Error::Write {
                path: out.to_path_buf(),
                reason: format!("cannot encode PNG frame {i}: {e}"),
            })?;
        pngs.push((PathBuf::from(frame_name(i)), png));
    }
    Ok(pngs)
}

/// Writes `files` (paths relative to `dir`). A new `dir` is built as a temporary folder beside it
/// and renamed into place, so a failure leaves no partial folder; in an existing `dir` every file
/// goes through [`write_atomic`].
fn write_folder(dir: &Path, files: impl IntoIterator<Item = (PathBuf, Vec<u8>)>) -> Result<()> {
    if dir.is_dir() {
        for (rel, bytes) in files {
            let p = dir.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::Write {
                    path: parent.to_path_buf(),
                    reason: e.to_string(),
                })?;
            }
            write_atomic(&p, &bytes)?;
        }
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Write {
            path: dir.to_path_buf(),
            reason: "not a folder name".into(),
        })?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.lowtide-{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        std::fs::create_dir(&tmp)?;
        for (rel, bytes) in files {
            let p = tmp.join(rel);
            if let Some(sub) = p.parent() {
                std::fs::create_dir_all(sub)?;
            }
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        Error::Write {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        }
    })
}

/// Frame `i` of (T, H, W, 3) as f32 on the CPU, H·W·3 values.
fn frame_f32(frames: &Tensor, i: usize) -> Result<Vec<f32>> {
    Ok(frames
        .get(i)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// One RGB frame in [0, 1] (H·W·3 values) as I420 (planar 4:2:0) of the even size `(we, he)`,
/// BT.709 limited range: the matrix and range the SPS's VUI declares, so ffmpeg and browsers
/// convert back with the same one. Odd sizes repeat the last column/row. Chroma is the mean of
/// each 2×2 block. Works from the f32 values, so there is one rounding, not two.
fn rgb_to_i420(rgb: &[f32], w: usize, h: usize, we: usize, he: usize) -> Vec<u8> {
    const KR: f32 = 0.2126;
    const KB: f32 = 0.0722;
    const KG: f32 = 1.0 - KR - KB;
    let px = |x: usize, y: usize| {
        let o = (y.min(h - 1) * w + x.min(w - 1)) * 3;
        let c = |v: f32| v.clamp(0.0, 1.0);
        (c(rgb[o]), c(rgb[o + 1]), c(rgb[o + 2]))
    };
    let luma = |(r, g, b): (f32, f32, f32)| KR * r + KG * g + KB * b;
    let to_u8 = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    let (cw, ch) = (we / 2, he / 2);
    let mut out = vec![0u8; we * he + 2 * cw * ch];
    let (y_plane, uv) = out.split_at_mut(we * he);
    let (u_plane, v_plane) = uv.split_at_mut(cw * ch);
    for y in 0..he {
        for x in 0..we {
            y_plane[y * we + x] = to_u8(16.0 + 219.0 * luma(px(x, y)));
        }
    }
    for cy in 0..ch {
        for cx in 0..cw {
            let mut sum = (0.0, 0.0, 0.0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = px(2 * cx + dx, 2 * cy + dy);
                sum = (sum.0 + p.0, sum.1 + p.1, sum.2 + p.2);
            }
            let (r, g, b) = (sum.0 / 4.0, sum.1 / 4.0, sum.2 / 4.0);
            let l = luma((r, g, b));
            u_plane[cy * cw + cx] = to_u8(128.0 + 224.0 * (b - l) / (2.0 * (1.0 - KB)));
            v_plane[cy * cw + cx] = to_u8(128.0 + 224.0 * (r - l) / (2.0 * (1.0 - KR)));
        }
    }
    out
}

/// The target bit rate given to the encoder: with the quantiser fixed it does not change the
/// picture, only the H.264 level the encoder declares (derived from size, frame rate and bit
/// rate), so it is what QP 16 produces at worst: two bits per pixel, as on strong synthetic
/// texture (a smooth 832×480 video takes 0.2).
fn bitrate(width: usize, height: usize, fps: u32) -> u32 {
    let bps = width as u64 * height as u64 * fps as u64 * 2;
    bps.clamp(100_000, 200_000_000) as u32
}

/// NAL unit type (the low 5 bits of the header byte).
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_IDR: u8 = 5;

/// Encodes one video (T, H, W, 3) in [0, 1] as the bytes of an MP4 file. Errors are the reason
/// only; the caller adds the path.
fn encode_mp4(frames: &Tensor, fps: u32) -> std::result::Result<Vec<u8>, String> {
    let (t, h, w, c) = frames.dims4().map_err(|e| e.to_string())?;
    if c != 3 || t == 0 || h == 0 || w == 0 {
        return Err(format!(
            "a video must be (T, H, W, 3) with no empty dimension; got {:?}",
            frames.dims()
        ));
    }
    if fps == 0 || fps > MAX_FPS {
        return Err(format!(
            "the frame rate {fps} is not between 1 and {MAX_FPS}"
        ));
    }
    let (we, he) = (w + w % 2, h + h % 2);
    // OpenH264's limit (level 5.2); checked here to name the size in the message.
    if we.max(he) > 3840 || we.min(he) > 2160 {
        return Err(format!(
            "{w}×{h} is larger than H.264 encoding supports here (3840×2160 or 2160×3840)"
        ));
    }
    let config = EncoderConfig::new()
        .profile(Profile::Baseline)
        .complexity(Complexity::High)
        // A fixed quantiser: rate control may only choose within [QP, QP] (+2 on a scene cut).
        // OpenH264's "off" mode ignores this range (it uses an internal 26), and its quality and
        // bit-rate modes print a warning when frame skipping is off. No frame is ever skipped: a
        // skipped frame would shorten the video.
        .rate_control_mode(RateControlMode::Bufferbased)
        .bitrate(BitRate::from_bps(bitrate(we, he, fps)))
        .qp(QpRange::new(QP, QP))
        .adaptive_quantization(false)
        .background_detection(false)
        .skip_frames(false)
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        // A keyframe every second, so players can seek.
        .intra_frame_period(IntraFramePeriod::from_num_frames(fps))
        .sps_pps_strategy(SpsPpsStrategy::ConstantId)
        .vui(VuiConfig::bt709())
        // One thread: the bytes do not depend on thread timing (the test checks two runs match).
        .num_threads(1);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| format!("cannot start the H.264 encoder: {e}"))?;

    let mut sps: Option<Vec<u8>> = None;
    let mut pps: Option<Vec<u8>> = None;
    let mut samples = Vec::with_capacity(t);
    for i in 0..t {
        let rgb = frame_f32(frames, i).map_err(|e| e.to_string())?;
        let yuv = YUVBuffer::from_vec(rgb_to_i420(&rgb, w, h, we, he), we, he);
        let ms = i as u64 * 1000 / fps as u64;
        let stream = encoder
            .encode_at(&yuv, Timestamp::from_millis(ms))
            .map_err(|e| format!("H.264 encoding failed at frame {i}: {e}"))?;
        if matches!(stream.frame_type(), FrameType::Skip | FrameType::Invalid) {
            return Err(format!(
                "the H.264 encoder dropped frame {i} ({:?})",
                stream.frame_type()
            ));
        }
        // The encoder writes Annex B (start-code-separated NAL units); MP4 wants parameter sets
        // in `avcC` and each sample as 4-byte-length-prefixed NAL units.
        let mut sample = Sample::default();
        for l in 0..stream.num_layers() {
            let Some(layer) = stream.layer(l) else {
                continue;
            };
            for n in 0..layer.nal_count() {
                let Some(nal) = layer.nal_unit(n).map(strip_start_code) else {
                    continue;
                };
                let Some(&header) = nal.first() else {
                    continue;
                };
                match header & 0x1f {
                    NAL_SPS => keep_parameter_set(&mut sps, nal, "SPS")?,
                    NAL_PPS => keep_parameter_set(&mut pps, nal, "PPS")?,
                    kind => {
                        sample.sync |= kind == NAL_IDR;
                        sample
                            .bytes
                            .extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        sample.bytes.extend_from_slice(nal);
                    }
                }
            }
        }
        if sample.bytes.is_empty() {
            return Err(format!(
                "the H.264 encoder returned no picture for frame {i}"
            ));
        }
        samples.push(sample);
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err("the H.264 encoder wrote no SPS/PPS".into());
    };
    let track = AvcConfig {
        width: we as u16,
        height: he as u16,
        seq_param_set: sps,
        pic_param_set: pps,
    };
    mux(track, samples, fps).map_err(|e| e.to_string())
}

/// One encoded frame: its NAL units, each with a 4-byte big-endian length, and whether it is a
/// keyframe (IDR).
#[derive(Default)]
struct Sample {
    bytes: Vec<u8>,
    sync: bool,
}

/// A NAL unit without its Annex B start code (`00 00 01` or `00 00 00 01`).
fn strip_start_code(nal: &[u8]) -> &[u8] {
    if let Some(rest) = nal.strip_prefix(&[0, 0, 0, 1]) {
        rest
    } else {
        nal.strip_prefix(&[0, 0, 1]).unwrap_or(nal)
    }
}

/// Keeps the first SPS/PPS; the encoder repeats them before every keyframe, and with constant
/// ids and settings they must not change (one `avcC` describes the whole track).
fn keep_parameter_set(
    slot: &mut Option<Vec<u8>>,
    nal: &[u8],
    what: &str,
) -> std::result::Result<(), String> {
    match slot {
        None => *slot = Some(nal.to_vec()),
        Some(first) if first.as_slice() == nal => {}
        Some(_) => return Err(format!("the H.264 encoder changed its {what} mid-stream")),
    }
    Ok(())
}

/// Muxes the samples with the `mp4` crate's writer, one per frame, then moves `moov` before
/// `mdat` ([`faststart`]). Movie and track share one time scale, so every duration is an exact
/// count of ticks (the writer would otherwise round each frame's share of the movie duration
/// down).
fn mux(track: AvcConfig, samples: Vec<Sample>, fps: u32) -> mp4::Result<Vec<u8>> {
    let brand = |s: &[u8; 4]| FourCC::from(*s);
    let timescale = fps * TICKS_PER_FRAME;
    let config = Mp4Config {
        major_brand: brand(b"isom"),
        minor_version: 512,
        compatible_brands: vec![
            brand(b"isom"),
            brand(b"iso2"),
            brand(b"avc1"),
            brand(b"mp41"),
        ],
        timescale,
    };
    let mut writer = Mp4Writer::write_start(Cursor::new(Vec::new()), &config)?;
    writer.add_track(&TrackConfig {
        track_type: TrackType::Video,
        timescale,
        language: "und".into(),
        media_conf: MediaConfig::AvcConfig(track),
    })?;
    for (i, sample) in samples.into_iter().enumerate() {
        writer.write_sample(
            1,
            &Mp4Sample {
                start_time: i as u64 * TICKS_PER_FRAME as u64,
                duration: TICKS_PER_FRAME,
                rendering_offset: 0, // no B-frames: decode order is display order
                is_sync: sample.sync,
                bytes: sample.bytes.into(),
            },
        )?;
    }
    writer.write_end()?;
    faststart(writer.into_writer().into_inner())
}

/// Rewrites `[ftyp][mdat][moov]`, as `Mp4Writer` lays a file out, as `[ftyp][moov][mdat]`, so a
/// browser can start playing before the whole file has arrived, shifting the chunk offsets by
/// the size of the moved `moov`. Also drops the 8-byte `wide` placeholder the writer leaves at the
/// start of `mdat`'s payload, and fixes three header fields the writer leaves at defaults that
/// the spec says otherwise: `tkhd` flags (enabled, in movie) and volume (0 for video), `vmhd`
/// flags (1) and `mvhd.next_track_id` (one past the last track).
fn faststart(file: Vec<u8>) -> mp4::Result<Vec<u8>> {
    let bad = |what: &'static str| mp4::Error::InvalidData(what);
    let reader = Mp4Reader::read_header(Cursor::new(&file), file.len() as u64)?;
    let ftyp_size = reader.ftyp.box_size() as usize;
    let mut moov = reader.moov;
    let moov_size = moov.box_size() as usize;
    let moov_start = file
        .len()
        .checked_sub(moov_size)
        .filter(|&s| s >= ftyp_size && file[s + 4..s + 8] == *b"moov")
        .ok_or(bad("moov is not the last box"))?;
    let mdat = &file[ftyp_size..moov_start];
    if mdat.len() < 16 || mdat[4..8] != *b"mdat" {
        return Err(bad("mdat does not follow ftyp"));
    }
    // An 8-byte size and a `wide` box inside mdat's payload; a file past 4 GiB uses that room for
    // a 64-bit size instead, and is kept as it is.
    let wide = mdat[..4] != [0, 0, 0, 1] && mdat[8..16] == [0, 0, 0, 8, b'w', b'i', b'd', b'e'];
    let (header, payload): (Vec<u8>, &[u8]) = if wide {
        let size = u32::try_from(mdat.len() - 8).map_err(|_| bad("mdat size"))?;
        let mut h = size.to_be_bytes().to_vec();
        h.extend_from_slice(b"mdat");
        (h, &mdat[16..])
    } else {
        (mdat[..16].to_vec(), &mdat[16..])
    };
    // Sample data moves from `16 + ftyp` into mdat to `ftyp + moov + header`.
    let shift = (ftyp_size + moov_size + header.len()) as i64 - (ftyp_size + 16) as i64;
    moov.mvhd.next_track_id = moov.traks.len() as u32 + 1;
    for trak in &mut moov.traks {
        trak.tkhd.flags = 0x3;
        trak.tkhd.volume = FixedPointU8::new(0); // a video track
        if let Some(vmhd) = trak.mdia.minf.vmhd.as_mut() {
            vmhd.flags = 1;
        }
        let stbl = &mut trak.mdia.minf.stbl;
        if let Some(stco) = stbl.stco.as_mut() {
            for e in &mut stco.entries {
                *e = u32::try_from(*e as i64 + shift).map_err(|_| bad("chunk offset"))?;
            }
        }
        if let Some(co64) = stbl.co64.as_mut() {
            for e in &mut co64.entries {
                *e = u64::try_from(*e as i64 + shift).map_err(|_| bad("chunk offset"))?;
            }
        }
    }
    if moov.box_size() as usize != moov_size {
        return Err(bad("moov changed size"));
    }
    let mut out = Vec::with_capacity(file.len());
    out.extend_from_slice(&file[..ftyp_size]);
    moov.write_box(&mut out)?;
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(out)
}
