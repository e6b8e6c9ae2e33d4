//! Zero-copy weights: a tensor whose stored dtype is the one a layer needs is backed by the
//! checkpoint's own pages instead of a copy.
//!
//! candle's CPU storage owns a `Vec<T>`, so a mapped tensor is a `Vec` whose buffer is a private
//! file mapping. That is sound only when the program's global allocator is [`MappedAlloc`] (the
//! `lowtide` binary installs it; a program that does not simply gets copies): it keeps a registry
//! of the mappings handed out and, when such a `Vec` is freed (the tensor dropped, e.g.
//! offloaded), unmaps it instead of passing it to the inner allocator. Every other allocation goes
//! straight to the inner allocator; the registry is consulted only for frees of at least the
//! mapping threshold (1 MiB), which are rare (one per large tensor).
//!
//! The mapping is `MAP_PRIVATE`: the file is never written, and a (never expected) write into a
//! weight would copy that page. Pages are populated when the tensor is made (`MADV_POPULATE_READ`,
//! page tables pointing at the page cache, no copy), so a file truncated before that is a clean
//! error, and run time does not pay first-touch faults. Resident bytes are the tensor's bytes
//! (plus at most one partial page at each end), and unmapping gives them back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// Tensors smaller than this are copied: mapping costs a system call and a VMA each, and small
/// tensors (biases, norms) are a negligible share of the bytes. `LOWTIDE_MMAP_MIN_BYTES`
/// overrides it (the tests map the tiny fixtures' tensors with 0).
static MIN_BYTES: AtomicUsize = AtomicUsize::new(1 << 20);

/// Set by the first allocation through [`MappedAlloc`]: mapping is only done when it is the
/// global allocator.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Maps tensors from `bytes` up (only ever lowers the threshold: a buffer mapped under the old
/// one must still be recognised when freed). Tests use it to map the tiny fixtures' tensors.
pub fn lower_threshold(bytes: usize) {
    min_bytes();
    MIN_BYTES.fetch_min(bytes, Relaxed);
}

/// Replaces the bare "Bus error" a process gets when a mapped checkpoint is truncated on disk
/// while its tensors are in use (e.g. `cp` over it) with a message saying so.
pub fn explain_bus_errors() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"error: a weight file was truncated or overwritten on disk while its \
tensors were in use (lowtide maps checkpoints; replace files by renaming, not by writing over \
them)\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, MSG.as_ptr() as *const libc::c_void, MSG.len());
            libc::_exit(1);
        }
    }
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

fn min_bytes() -> usize {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if let Some(n) = std::env::var("LOWTIDE_MMAP_MIN_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            MIN_BYTES.store(n, Relaxed);
        }
    });
    MIN_BYTES.load(Relaxed)
}

/// Mapping base and length, by the data pointer handed out.
static REGISTRY: Mutex<Option<HashMap<usize, (usize, usize)>>> = Mutex::new(None);

thread_local! {
    /// Set while this thread holds the registry lock, so that frees made by the registry's own
    /// map (resizing) are not looked up in it (which would deadlock).
    static IN_REGISTRY: Cell<bool> = const { Cell::new(false) };
}

fn with_registry<R>(f: impl FnOnce(&mut HashMap<usize, (usize, usize)>) -> R) -> R {
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    IN_REGISTRY.with(|c| c.set(true));
    let r = f(g.get_or_insert_with(HashMap::new));
    IN_REGISTRY.with(|c| c.set(false));
    r
}

/// Removes `ptr` from the registry when it is a mapped buffer; returns its mapping.
fn take_mapping(ptr: *mut u8, size: usize) -> Option<(usize, usize)> {
    if size < MIN_BYTES.load(Relaxed) || IN_REGISTRY.with(|c| c.get()) {
        return None;
    }
    with_registry(|r| r.remove(&(ptr as usize)))
}

fn unmap(base: usize, len: usize) {
    // SAFETY: (base, len) is a mapping this module created and nothing references any more (its
    // only user, the Vec, is being freed).
    unsafe {
        libc::munmap(base as *mut libc::c_void, len);
    }
}

/// A global allocator (`A`, usually [`System`]) that also owns the mapped buffers of [`map_vec`]:
/// `#[global_allocator] static A: MappedAlloc = MappedAlloc(System);`
pub struct MappedAlloc<A = System>(pub A);

// SAFETY: every method forwards to `A` except for pointers found in the registry, which were
// created by `map_vec` with exactly the Vec's layout and are released with munmap.
unsafe impl<A: GlobalAlloc> GlobalAlloc for MappedAlloc<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Relaxed) {
            INSTALLED.store(true, Relaxed);
        }
        self.0.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Relaxed) {
            INSTALLED.store(true, Relaxed);
        }
        self.0.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match take_mapping(ptr, layout.size()) {
            Some((base, len)) => unmap(base, len),
            None => self.0.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match take_mapping(ptr, layout.size()) {
            Some((base, len)) => {
                let new = self
                    .0
                    .alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                }
                unmap(base, len);
                new
            }
            None => self.0.realloc(ptr, layout, new_size),
        }
    }
}

/// Why a tensor could not be mapped: the caller reads it instead, or reports the error.
pub enum MapError {
    /// Too small, misaligned for `T`, [`MappedAlloc`] not installed, or the platform refused the
    /// mapping: copy instead.
    Unsuitable,
    /// The file ends before the tensor does (populating its pages failed).
    Truncated,
}

/// A `Vec<T>` of `n` elements backed by the file's bytes at `start..start + n * size_of::<T>()`.
///
/// `T` must be a plain little-endian numeric type (f32, f16, bf16) for which every bit pattern is
/// valid; the host must be little-endian (safetensors is).
pub fn map_vec<T: Copy>(file: &File, start: u64, n: usize) -> Result<Vec<T>, MapError> {
    let bytes = n * std::mem::size_of::<T>();
    let page = page_size();
    let in_page = (start % page as u64) as usize;
    if !INSTALLED.load(Relaxed)
        || cfg!(target_endian = "big")
        || bytes < min_bytes()
        || !in_page.is_multiple_of(std::mem::align_of::<T>())
    {
        return Err(MapError::Unsuitable);
    }
    let len = in_page + bytes;
    // SAFETY: a new private mapping of a file we hold open; the kernel picks the address.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            (start - in_page as u64) as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(MapError::Unsuitable);
    }
    if !populate(base as *mut u8, len) {
        unmap(base as usize, len);
        return Err(MapError::Truncated);
    }
    // SAFETY: `base + in_page` is aligned for T (checked above) and `n` elements lie inside the
    // populated mapping.
    let ptr = unsafe { (base as *mut u8).add(in_page) };
    with_registry(|r| r.insert(ptr as usize, (base as usize, len)));
    // SAFETY: the registry entry makes `MappedAlloc` (the global allocator: INSTALLED) own this
    // buffer with the layout of a Vec<T> of capacity n (size >= the threshold, T's alignment), so
    // freeing or growing the Vec unmaps it; every bit pattern is a valid T.
    Ok(unsafe { Vec::from_raw_parts(ptr as *mut T, n, n) })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// Maps every page of the range now (reading from disk if the page cache does not have it), so
/// later accesses cannot fault on a missing file page. False when the file is shorter than the
/// range.
fn populate(base: *mut u8, len: usize) -> bool {
    // MADV_POPULATE_READ (Linux 5.14): page tables for reading, without breaking copy-on-write.
    const MADV_POPULATE_READ: libc::c_int = 22;
    // SAFETY: the range is a mapping we just created.
    let r = unsafe { libc::madvise(base as *mut libc::c_void, len, MADV_POPULATE_READ) };
    if r == 0 {
        return true;
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return false; // EFAULT/EIO: a page past the end of the file
    }
    // Older kernels: read ahead, then touch each page (a page past the end would SIGBUS, so the
    // caller has checked the file's length against the header before mapping).
    // SAFETY: as above; reads stay inside the mapping.
    unsafe {
        libc::madvise(base as *mut libc::c_void, len, libc::MADV_WILLNEED);
        let page = page_size();
        let mut sum = 0u8;
        for off in (0..len).step_by(page) {
            sum ^= std::ptr::read_volatile(base.add(off));
        }
        std::hint::black_box(sum);
    }
    true
}

/// Whether `ptr` is the data of a live mapped buffer.
pub fn is_mapped<T>(ptr: *const T) -> bool {
    with_registry(|r| r.contains_key(&(ptr as usize)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[global_allocator]
    static ALLOC: MappedAlloc = MappedAlloc(System);

    #[test]
    fn a_mapped_vec_reads_the_file_and_is_unmapped_when_dropped() {
        let n = (1 << 20) / 4 + 3;
        let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 12]).unwrap(); // tensor starts mid-page, 4-aligned
        for v in &data {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
        f.flush().unwrap();
        let v: Vec<f32> = map_vec(f.as_file(), 12, n).ok().unwrap();
        assert_eq!(v, data);
        let p = v.as_ptr();
        assert!(is_mapped(p));
        drop(v);
        assert!(!is_mapped(p));
        // Growing a mapped Vec moves it to the heap.
        let mut w: Vec<f32> = map_vec(f.as_file(), 12, n).ok().unwrap();
        let p = w.as_ptr();
        w.push(7.0);
        assert!(!is_mapped(p));
        assert_eq!(&w[..n], &data[..]);
        assert!(matches!(
            map_vec::<f32>(f.as_file(), 13, n),
            Err(MapError::Unsuitable)
        ));
        assert!(matches!(
            map_vec::<f32>(f.as_file(), 12, n + 4096),
            Err(MapError::Truncated)
        ));
        assert!(matches!(
            map_vec::<f32>(f.as_file(), 12, 16),
            Err(MapError::Unsuitable)
        ));
    }
}
