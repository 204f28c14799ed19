//! Safe wrappers over the worker's C++ shim (`worker/shim/trainq_shim.cpp`, built by build.rs):
//! the libtorch calls tch 0.24 does not expose. CUDA graphs ([`CudaGraph`]), the calling
//! thread's CUDA stream ([`use_pool_stream`]), the channels_last memory format
//! ([`channels_last`]), autocast to bf16 ([`Autocast`]) and the CUDA allocator's statistics
//! ([`cuda_memory`]).
//!
//! Every shim call reports C++ exceptions as a message, mapped to [`ShimError`] here; nothing in
//! the shim aborts. The CUDA calls check at run time that a device is present (and answer "built
//! without CUDA" when the shim was compiled without CUDA headers), so a binary built on a
//! machine without a GPU runs everywhere. Like tch's tensors, the handles here belong to the
//! thread that made them (`!Send`): autocast state and the current stream are per thread.
//!
//! Must not know about jobs, specs or the training loop: [`crate::train::step`] uses it.
//!
//! The one module of the workspace allowed `unsafe` (the workspace denies it): each block is one
//! FFI call, with its safety argument beside it.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::PhantomData;

use tch::{Device, Kind, Tensor};

/// A failed shim call: the C++ exception's message and the call that raised it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}: {message}")]
pub struct ShimError {
    pub call: &'static str,
    pub message: String,
}

impl From<ShimError> for tch::TchError {
    fn from(e: ShimError) -> Self {
        tch::TchError::Torch(e.to_string())
    }
}

mod ffi {
    use super::*;

    extern "C" {
        pub fn tq_free_error(error: *mut c_char);
        pub fn tq_set_malloc_thresholds(
            mmap_threshold: std::ffi::c_long,
            trim_threshold: std::ffi::c_long,
        ) -> c_int;
        pub fn tq_cuda_usable() -> c_int;
        pub fn tq_built_with_cuda() -> c_int;
        pub fn tq_channels_last(t: *const c_void, out: *mut *mut c_void) -> *mut c_char;
        pub fn tq_is_channels_last(t: *const c_void, out: *mut c_int) -> *mut c_char;
        pub fn tq_autocast_enter(
            device: c_int,
            dtype: c_int,
            cache: c_int,
            prev_enabled: *mut c_int,
            prev_dtype: *mut c_int,
            prev_cache: *mut c_int,
        ) -> *mut c_char;
        pub fn tq_autocast_exit(
            device: c_int,
            prev_enabled: c_int,
            prev_dtype: c_int,
            prev_cache: c_int,
        ) -> *mut c_char;
        pub fn tq_use_pool_stream(device: c_int) -> *mut c_char;
        pub fn tq_cuda_memory(
            device: c_int,
            allocated: *mut i64,
            reserved: *mut i64,
            peak: *mut i64,
        ) -> *mut c_char;
        pub fn tq_cuda_reset_peak(device: c_int) -> *mut c_char;
        pub fn tq_cuda_capability(
            device: c_int,
            major: *mut c_int,
            minor: *mut c_int,
        ) -> *mut c_char;
        pub fn tq_graph_new(device: c_int, out: *mut *mut c_void) -> *mut c_char;
        pub fn tq_graph_free(graph: *mut c_void);
        pub fn tq_graph_side_stream_begin(graph: *mut c_void) -> *mut c_char;
        pub fn tq_graph_side_stream_end(graph: *mut c_void) -> *mut c_char;
        pub fn tq_graph_capture_begin(graph: *mut c_void) -> *mut c_char;
        pub fn tq_graph_capture_end(graph: *mut c_void) -> *mut c_char;
        pub fn tq_graph_replay(graph: *mut c_void) -> *mut c_char;
        pub fn tq_graph_reset(graph: *mut c_void) -> *mut c_char;
    }
}

/// Turns a shim call's returned error (NULL: success) into a `Result`, freeing the message.
fn check(call: &'static str, error: *mut c_char) -> Result<(), ShimError> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim, freed once here.
    let message = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::tq_free_error(error) };
    Err(ShimError { call, message })
}

/// glibc malloc's mmap threshold the worker sets: the largest glibc accepts (32 MiB on 64-bit).
pub const MALLOC_MMAP_THRESHOLD: i64 = 32 << 20;
/// ... and its trim threshold: up to this much freed memory stays in the process.
pub const MALLOC_TRIM_THRESHOLD: i64 = 256 << 20;

/// The environment variables with which a user sets glibc malloc's thresholds themselves.
const MALLOC_VARIABLES: [&str; 3] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Keeps freed memory in the process for reuse (see [`MALLOC_MMAP_THRESHOLD`]): by default glibc
/// serves a CPU training step's activations (hundreds of kB to MBs each) with fresh mappings and
/// returns them to the OS when they are freed, so every step faults its memory in again. With
/// the seed CVAE at batch 128 on a CPU that was 2.6x the page faults of the same step in PyTorch
/// (whose interpreter's heap happens to block trimming) and most of the gap between the two.
/// Leaves glibc alone when the user set any of its malloc variables. Returns whether it changed
/// the thresholds.
pub fn keep_freed_memory() -> bool {
    if MALLOC_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        return false;
    }
    // SAFETY: plain integer arguments; mallopt only changes malloc's parameters.
    unsafe {
        ffi::tq_set_malloc_thresholds(
            MALLOC_MMAP_THRESHOLD as std::ffi::c_long,
            MALLOC_TRIM_THRESHOLD as std::ffi::c_long,
        ) == 1
    }
}

/// Whether this binary's shim has CUDA support and a CUDA device is present.
pub fn cuda_usable() -> bool {
    // SAFETY: no arguments; the shim catches everything.
    unsafe { ffi::tq_cuda_usable() == 1 }
}

/// Whether the shim was compiled with CUDA (graphs, streams) at all.
pub fn built_with_cuda() -> bool {
    // SAFETY: no arguments.
    unsafe { ffi::tq_built_with_cuda() == 1 }
}

fn cuda_index(device: Device, call: &'static str) -> Result<c_int, ShimError> {
    match device {
        Device::Cuda(i) => c_int::try_from(i).map_err(|_| ShimError {
            call,
            message: format!("CUDA device index {i} is out of range"),
        }),
        other => Err(ShimError {
            call,
            message: format!("{other:?} is not a CUDA device"),
        }),
    }
}

/// A channels_last copy of the 4-D tensor `t` (`t` itself, shared, when it already is).
pub fn channels_last(t: &Tensor) -> Result<Tensor, ShimError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: `t` outlives the call; on success `out` is a new at::Tensor handle we own.
    check("channels_last", unsafe {
        ffi::tq_channels_last(t.as_ptr() as *const c_void, &mut out)
    })?;
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// Whether `t` is laid out channels_last (and not also plain contiguous, as size-1 dims allow).
pub fn is_channels_last(t: &Tensor) -> Result<bool, ShimError> {
    let mut out: c_int = 0;
    // SAFETY: `t` outlives the call.
    check("is_channels_last", unsafe {
        ffi::tq_is_channels_last(t.as_ptr() as *const c_void, &mut out)
    })?;
    Ok(out == 1)
}

fn dtype_code(kind: Kind) -> Option<c_int> {
    match kind {
        Kind::Float => Some(0),
        Kind::BFloat16 => Some(1),
        Kind::Half => Some(2),
        _ => None,
    }
}

fn code_device(device: Device) -> c_int {
    match device {
        Device::Cpu => 0,
        _ => 1,
    }
}

/// Autocast (mixed precision) on the calling thread while the guard lives: on `device`'s type,
/// eligible ops (convolutions, matmuls) run in `dtype`, the rest as PyTorch's autocast lists say.
/// Dropping the guard restores the previous settings.
pub struct Autocast {
    device: c_int,
    prev: (c_int, c_int, c_int),
    _thread: PhantomData<*const ()>,
}

impl Autocast {
    /// Enters autocast to `dtype` (bf16 or f16) on `device`; `cache` keeps cast weights for the
    /// region (off while capturing a CUDA graph, as PyTorch recommends).
    pub fn enter(device: Device, dtype: Kind, cache: bool) -> Result<Self, ShimError> {
        let code = dtype_code(dtype).ok_or_else(|| ShimError {
            call: "autocast_enter",
            message: format!("autocast to {dtype:?} is not supported"),
        })?;
        let device = code_device(device);
        let (mut e, mut d, mut c) = (0, 0, 0);
        // SAFETY: plain out-parameters.
        check("autocast_enter", unsafe {
            ffi::tq_autocast_enter(device, code, c_int::from(cache), &mut e, &mut d, &mut c)
        })?;
        Ok(Self {
            device,
            prev: (e, d, c),
            _thread: PhantomData,
        })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        let (e, d, c) = self.prev;
        // SAFETY: restores what enter returned; an error here has nowhere to go but the log.
        if let Err(err) = check("autocast_exit", unsafe {
            ffi::tq_autocast_exit(self.device, e, d, c)
        }) {
            tracing::warn!(error = %err, "leaving autocast failed");
        }
    }
}

/// Makes a stream from libtorch's pool the calling thread's current CUDA stream on `device`, so
/// this thread's kernels (one worker slot's job) overlap with other threads' on the same GPU.
pub fn use_pool_stream(device: Device) -> Result<(), ShimError> {
    let index = cuda_index(device, "use_pool_stream")?;
    // SAFETY: plain argument.
    check("use_pool_stream", unsafe { ffi::tq_use_pool_stream(index) })
}

/// The CUDA caching allocator's view of `device`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    pub allocated: i64,
    pub reserved: i64,
    /// The most allocated at once since [`cuda_reset_peak`] (or the start).
    pub peak_allocated: i64,
}

pub fn cuda_memory(device: Device) -> Result<CudaMemory, ShimError> {
    let index = cuda_index(device, "cuda_memory")?;
    let (mut a, mut r, mut p) = (0, 0, 0);
    // SAFETY: plain out-parameters.
    check("cuda_memory", unsafe {
        ffi::tq_cuda_memory(index, &mut a, &mut r, &mut p)
    })?;
    Ok(CudaMemory {
        allocated: a,
        reserved: r,
        peak_allocated: p,
    })
}

pub fn cuda_reset_peak(device: Device) -> Result<(), ShimError> {
    let index = cuda_index(device, "cuda_reset_peak")?;
    // SAFETY: plain argument.
    check("cuda_reset_peak", unsafe { ffi::tq_cuda_reset_peak(index) })
}

/// The compute capability `(major, minor)` of a CUDA device.
pub fn cuda_capability(device: Device) -> Result<(i32, i32), ShimError> {
    let index = cuda_index(device, "cuda_capability")?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    check("cuda_capability", unsafe {
        ffi::tq_cuda_capability(index, &mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// One CUDA graph (`at::cuda::CUDAGraph`) with the side stream it is warmed up and captured on.
///
/// Use: [`CudaGraph::new`], [`CudaGraph::on_side_stream`] around the warm-up steps and
/// [`CudaGraph::capture`] (which also runs on the side stream), then [`CudaGraph::replay`] per
/// step. Capture uses thread-local mode, so other threads (slots) may go on working meanwhile.
pub struct CudaGraph {
    raw: *mut c_void,
}

impl CudaGraph {
    pub fn new(device: Device) -> Result<Self, ShimError> {
        let index = cuda_index(device, "graph_new")?;
        let mut raw: *mut c_void = std::ptr::null_mut();
        // SAFETY: on success `raw` is a new Graph we own (freed in Drop).
        check("graph_new", unsafe { ffi::tq_graph_new(index, &mut raw) })?;
        Ok(Self { raw })
    }

    /// Runs `f` with the calling thread switched to the graph's side stream (which first waits
    /// for the current stream; the current one waits for it afterwards).
    pub fn on_side_stream<T, E: From<ShimError>>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, E>,
    ) -> Result<T, E> {
        // SAFETY: `raw` is live for `self`'s lifetime.
        check("graph_side_stream_begin", unsafe {
            ffi::tq_graph_side_stream_begin(self.raw)
        })?;
        let out = f(self);
        let back = check("graph_side_stream_end", unsafe {
            ffi::tq_graph_side_stream_end(self.raw)
        });
        let out = out?;
        back?;
        Ok(out)
    }

    /// Captures what `f` launches (call inside [`CudaGraph::on_side_stream`]). A failure inside
    /// `f` still ends the capture, and the error of `f` is the one returned.
    pub fn capture<T, E: From<ShimError>>(
        &mut self,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        // SAFETY: `raw` is live.
        check("graph_capture_begin", unsafe {
            ffi::tq_graph_capture_begin(self.raw)
        })?;
        let out = f();
        let end = check("graph_capture_end", unsafe {
            ffi::tq_graph_capture_end(self.raw)
        });
        let out = out?;
        end?;
        Ok(out)
    }

    /// Launches the captured work on the calling thread's current stream.
    pub fn replay(&mut self) -> Result<(), ShimError> {
        // SAFETY: `raw` is live.
        check("graph_replay", unsafe { ffi::tq_graph_replay(self.raw) })
    }

    /// Drops the captured graph and its memory pool.
    pub fn reset(&mut self) -> Result<(), ShimError> {
        // SAFETY: `raw` is live.
        check("graph_reset", unsafe { ffi::tq_graph_reset(self.raw) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from tq_graph_new and is freed once.
        unsafe { ffi::tq_graph_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_keeps_values_and_changes_the_strides() {
        let t = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).reshape([2, 3, 4, 5]);
        assert!(!is_channels_last(&t).expect("query"));
        let cl = channels_last(&t).expect("channels_last");
        assert!(is_channels_last(&cl).expect("query"));
        assert_eq!(cl.size(), [2, 3, 4, 5]);
        assert_eq!(cl.stride(), [60, 1, 15, 3]);
        assert!(cl.equal(&t), "same values in another layout");
    }

    #[test]
    fn a_shim_error_names_the_call_and_the_cpp_message() {
        let t = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let err = channels_last(&t).expect_err("1-D");
        assert_eq!(err.call, "channels_last");
        assert!(err.message.contains("4-D"), "{err}");
        let err = Autocast::enter(Device::Cpu, Kind::Int64, false)
            .err()
            .expect("no int autocast");
        assert!(err.message.contains("not supported"), "{err}");
    }

    #[test]
    fn cpu_autocast_runs_convolutions_in_bf16_and_restores_fp32_after() {
        let x = Tensor::rand([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::rand([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        let conv = |x: &Tensor| x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        {
            let _bf16 = Autocast::enter(Device::Cpu, Kind::BFloat16, true).expect("enter");
            assert_eq!(conv(&x).kind(), Kind::BFloat16);
            {
                let _nested = Autocast::enter(Device::Cpu, Kind::BFloat16, false).expect("nested");
                assert_eq!(conv(&x).kind(), Kind::BFloat16);
            }
            assert_eq!(
                conv(&x).kind(),
                Kind::BFloat16,
                "still inside the outer guard"
            );
        }
        assert_eq!(conv(&x).kind(), Kind::Float, "left autocast");
    }

    /// A CUDA libtorch must get a CUDA shim: without the CUDA headers build.rs builds one that
    /// cannot capture graphs, which only a GPU would notice.
    #[test]
    fn a_cuda_libtorch_gets_a_shim_built_with_cuda() {
        let libtorch_has_cuda = env!("TRAINQ_LIBTORCH_HAS_CUDA") == "1";
        assert_eq!(
            built_with_cuda(),
            libtorch_has_cuda,
            "libtorch has CUDA: {libtorch_has_cuda}; run scripts/setup.sh (nvidia-cuda-crt)"
        );
    }

    #[test]
    fn glibc_accepts_the_malloc_thresholds_unless_the_user_set_their_own() {
        let user_set = MALLOC_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        assert_eq!(keep_freed_memory(), !user_set);
    }

    #[test]
    fn cuda_calls_fail_cleanly_without_a_cuda_device() {
        if cuda_usable() {
            return; // this test is about hosts without a GPU; the cuda-tests feature covers GPUs
        }
        for err in [
            CudaGraph::new(Device::Cuda(0)).err().expect("no graph"),
            use_pool_stream(Device::Cuda(0)).expect_err("no stream"),
            cuda_memory(Device::Cuda(0)).expect_err("no memory"),
        ] {
            assert!(
                err.message.contains("no CUDA device") || err.message.contains("without CUDA"),
                "{err}"
            );
        }
        let err = cuda_memory(Device::Cpu).expect_err("not a CUDA device");
        assert!(err.message.contains("not a CUDA device"), "{err}");
    }
}
