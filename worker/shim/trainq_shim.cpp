// trainq's C++ shim: the few libtorch calls tch 0.24 does not expose, for the training engine.
//
//   - CUDA graphs (at::cuda::CUDAGraph): warm-up and capture on a side stream, replay, reset;
//   - the calling thread's current CUDA stream (one per worker slot);
//   - memory format: a tensor's channels_last copy, and whether a tensor is channels_last;
//   - autocast (mixed precision) on a device type with a dtype (bf16), entered and left;
//   - the CUDA caching allocator's statistics (allocated, reserved, peak) for memory estimates,
//     and a device's compute capability (whether it has bf16);
//   - glibc malloc's thresholds, so that a CPU training step's activations are reused from the
//     heap instead of being unmapped and faulted in again every step.
//
// Rules: every entry point catches every exception and returns it as a malloc'd message (NULL
// on success) that the caller frees with tq_free_error; nothing here aborts or prints. Tensors
// cross as tch's handles (`at::Tensor*`); a returned tensor is a new heap handle the caller owns
// (tch deletes it). Without CUDA (a CPU-only libtorch, or TRAINQ_SHIM_CUDA not defined by
// build.rs because no CUDA headers were found) the CUDA entry points compile to an error, and
// with CUDA they check at run time that a CUDA device exists before touching it, so the same
// binary runs on hosts without a GPU. The Rust side is worker/src/shim.rs.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Event.h>

#include <cstdlib>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <exception>
#include <optional>
#include <string>

#ifdef TRAINQ_SHIM_CUDA
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

char* error_text(const std::string& what) {
  char* out = static_cast<char*>(std::malloc(what.size() + 1));
  if (out != nullptr) std::memcpy(out, what.c_str(), what.size() + 1);
  return out;
}

// Runs `body`, turning any exception into an error message.
template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return error_text(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error_text(e.what());
  } catch (...) {
    return error_text("unknown C++ exception");
  }
}

at::DeviceType device_type(int code) {
  switch (code) {
    case 0: return at::kCPU;
    case 1: return at::kCUDA;
    default: throw std::invalid_argument("unknown device type code " + std::to_string(code));
  }
}

at::ScalarType scalar_type(int code) {
  switch (code) {
    case 0: return at::kFloat;
    case 1: return at::kBFloat16;
    case 2: return at::kHalf;
    default: throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  }
}

#ifdef TRAINQ_SHIM_CUDA
void require_cuda(int device) {
  if (!at::hasCUDA()) throw std::runtime_error("no CUDA device is available");
  int count = static_cast<int>(c10::cuda::device_count());
  if (device < 0 || device >= count) {
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" +
                                std::to_string(count) + " found)");
  }
}

// A CUDA graph with the side stream it is warmed up and captured on.
struct Graph {
  at::cuda::CUDAGraph graph;
  int device = -1;
  std::optional<c10::cuda::CUDAStream> previous;  // the stream before the side stream
  std::optional<c10::cuda::CUDAStream> side;
  bool capturing = false;
  bool captured = false;
};

// `waiter` waits for everything queued on `on` so far (no host synchronisation). Through
// c10::Event (libc10_cuda's device guard), not at::cuda::CUDAEvent, whose inline methods would
// make this binary call the CUDA runtime directly and need libcudart on its own library path.
void stream_wait(c10::cuda::CUDAStream waiter, c10::cuda::CUDAStream on) {
  c10::Event event(c10::DeviceType::CUDA);
  event.record(on.unwrap());
  event.block(waiter.unwrap());
}
#endif

// The body of a CUDA entry point: run guarded with CUDA, or answer kNoCuda without it (the body's
// tokens are then dropped, so it may name CUDA types freely).
#ifdef TRAINQ_SHIM_CUDA
#define CUDA_ONLY(...) return guarded([&] __VA_ARGS__)
#else
#define CUDA_ONLY(...) return error_text(kNoCuda)
#endif

constexpr const char* kNoCuda =
    "this worker's C++ shim was built without CUDA (a CPU-only libtorch, or no CUDA headers were "
    "found when it was built)";

}  // namespace

extern "C" {

void tq_free_error(char* error) { std::free(error); }

// Sets glibc malloc's mmap threshold (allocations at least this big get their own mapping,
// returned to the OS when freed) and trim threshold (free memory at the heap's top kept before
// it is given back). 1 when both were set; 0 where malloc is not glibc's or a value was refused.
int tq_set_malloc_thresholds(long mmap_threshold, long trim_threshold) {
#if defined(__GLIBC__)
  int a = mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_threshold));
  int b = mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim_threshold));
  return a == 1 && b == 1 ? 1 : 0;
#else
  (void)mmap_threshold; (void)trim_threshold;
  return 0;
#endif
}

// 1 when the shim was built with CUDA support and a CUDA device is present.
int tq_cuda_usable() {
#ifdef TRAINQ_SHIM_CUDA
  try {
    return at::hasCUDA() && c10::cuda::device_count() > 0 ? 1 : 0;
  } catch (...) {
    return 0;
  }
#else
  return 0;
#endif
}

// 1 when the shim was compiled with CUDA support (whether or not a device is present).
int tq_built_with_cuda() {
#ifdef TRAINQ_SHIM_CUDA
  return 1;
#else
  return 0;
#endif
}

// *out = a channels_last copy of `t` (4-D); the same storage when it already is.
char* tq_channels_last(const at::Tensor* t, at::Tensor** out) {
  return guarded([&] {
    if (t == nullptr || out == nullptr) throw std::invalid_argument("null tensor");
    if (t->dim() != 4) {
      throw std::invalid_argument("channels_last needs a 4-D tensor, got " +
                                  std::to_string(t->dim()) + " dimensions");
    }
    *out = new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
  });
}

// *out = 1 when `t` is laid out channels_last (and not also plain contiguous).
char* tq_is_channels_last(const at::Tensor* t, int* out) {
  return guarded([&] {
    if (t == nullptr || out == nullptr) throw std::invalid_argument("null tensor");
    *out = t->dim() == 4 && t->is_contiguous(at::MemoryFormat::ChannelsLast) &&
                   !t->is_contiguous()
               ? 1
               : 0;
  });
}

// Enters autocast on `device` (0 CPU, 1 CUDA) to `dtype` (0 f32, 1 bf16, 2 f16) on the calling
// thread, with the cast cache on or off; the previous settings go to *prev_enabled, *prev_dtype,
// *prev_cache for tq_autocast_exit.
char* tq_autocast_enter(int device, int dtype, int cache, int* prev_enabled, int* prev_dtype,
                        int* prev_cache) {
  return guarded([&] {
    at::DeviceType d = device_type(device);
    at::ScalarType s = scalar_type(dtype);
    bool was = at::autocast::is_autocast_enabled(d);
    at::ScalarType was_dtype = at::autocast::get_autocast_dtype(d);
    bool was_cache = at::autocast::is_autocast_cache_enabled();
    *prev_enabled = was ? 1 : 0;
    *prev_cache = was_cache ? 1 : 0;
    switch (was_dtype) {
      case at::kBFloat16: *prev_dtype = 1; break;
      case at::kHalf: *prev_dtype = 2; break;
      default: *prev_dtype = 0; break;
    }
    at::autocast::set_autocast_dtype(d, s);
    at::autocast::set_autocast_enabled(d, true);
    at::autocast::set_autocast_cache_enabled(cache != 0);
    at::autocast::increment_nesting();
  });
}

// Leaves autocast entered by tq_autocast_enter, restoring the settings it returned.
char* tq_autocast_exit(int device, int prev_enabled, int prev_dtype, int prev_cache) {
  return guarded([&] {
    at::DeviceType d = device_type(device);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(d, prev_enabled != 0);
    at::autocast::set_autocast_dtype(d, scalar_type(prev_dtype));
    at::autocast::set_autocast_cache_enabled(prev_cache != 0);
  });
}

// Makes a stream from libtorch's pool the calling thread's current stream on `device`, so the
// work of this thread (one worker slot) overlaps with other threads' work on the same GPU.
char* tq_use_pool_stream(int device) {
  CUDA_ONLY({
    require_cuda(device);
    c10::cuda::setCurrentCUDAStream(
        c10::cuda::getStreamFromPool(false, static_cast<c10::DeviceIndex>(device)));
  });
}

// The compute capability of `device` (8.0 and newer have bf16 tensor cores).
char* tq_cuda_capability(int device, int* major, int* minor) {
  CUDA_ONLY({
    require_cuda(device);
    const cudaDeviceProp* p = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device));
    *major = p->major;
    *minor = p->minor;
  });
}

// The caching allocator's bytes now allocated, reserved, and the peak allocated since the last
// tq_cuda_reset_peak, on `device`.
char* tq_cuda_memory(int device, int64_t* allocated, int64_t* reserved, int64_t* peak) {
  CUDA_ONLY({
    require_cuda(device);
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    constexpr size_t all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[all].current;
    *reserved = stats.reserved_bytes[all].current;
    *peak = stats.allocated_bytes[all].peak;
  });
}

char* tq_cuda_reset_peak(int device) {
  CUDA_ONLY({
    require_cuda(device);
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

// *out = a new, empty CUDA graph for `device`.
char* tq_graph_new(int device, void** out) {
  CUDA_ONLY({
    require_cuda(device);
    auto* g = new Graph();
    g->device = device;
    *out = g;
  });
}

void tq_graph_free(void* graph) {
#ifdef TRAINQ_SHIM_CUDA
  auto* g = static_cast<Graph*>(graph);
  if (g == nullptr) return;
  try {
    if (g->capturing) g->graph.capture_end();
  } catch (...) {
  }
  try {
    // Replays still in flight use the graph's memory pool, which deleting the graph releases.
    if (g->captured) c10::cuda::device_synchronize();
  } catch (...) {
  }
  if (g->previous) {
    try {
      c10::cuda::setCurrentCUDAStream(*g->previous);
    } catch (...) {
    }
  }
  delete g;
#else
  (void)graph;
#endif
}

// Switches the calling thread to a side stream (which first waits for the current one), for
// warm-up steps and the capture; tq_graph_side_stream_end switches back.
char* tq_graph_side_stream_begin(void* graph) {
  CUDA_ONLY({
    auto* g = static_cast<Graph*>(graph);
    if (g->previous) throw std::logic_error("already on the graph's side stream");
    auto dev = static_cast<c10::DeviceIndex>(g->device);
    auto current = c10::cuda::getCurrentCUDAStream(dev);
    auto side = c10::cuda::getStreamFromPool(false, dev);
    stream_wait(side, current);
    c10::cuda::setCurrentCUDAStream(side);
    g->previous = current;
    g->side = side;
  });
}

char* tq_graph_side_stream_end(void* graph) {
  CUDA_ONLY({
    auto* g = static_cast<Graph*>(graph);
    if (!g->previous) throw std::logic_error("not on the graph's side stream");
    if (g->capturing) throw std::logic_error("the capture has not ended");
    c10::cuda::setCurrentCUDAStream(*g->previous);
    stream_wait(*g->previous, *g->side);
    g->previous.reset();
    g->side.reset();
  });
}

// Starts capturing the calling thread's work on the side stream (thread-local capture mode, so
// other slots' threads may go on allocating and launching while this one captures).
char* tq_graph_capture_begin(void* graph) {
  CUDA_ONLY({
    auto* g = static_cast<Graph*>(graph);
    if (!g->previous) throw std::logic_error("capture needs the side stream: begin it first");
    if (g->capturing || g->captured) throw std::logic_error("the graph is already captured");
    g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    g->capturing = true;
  });
}

char* tq_graph_capture_end(void* graph) {
  CUDA_ONLY({
    auto* g = static_cast<Graph*>(graph);
    if (!g->capturing) throw std::logic_error("no capture in progress");
    g->capturing = false;
    g->graph.capture_end();
    g->captured = true;
  });
}

// Replays the captured work on the calling thread's current stream.
char* tq_graph_replay(void* graph) {
  CUDA_ONLY({
    auto* g = static_cast<Graph*>(graph);
    if (!g->captured) throw std::logic_error("nothing captured to replay");
    g->graph.replay();
  });
}

// Drops the captured graph and its memory pool; the graph can be captured again.
char* tq_graph_reset(void* graph) {
  CUDA_ONLY({
    auto* g = static_cast<Graph*>(graph);
    if (g->capturing) throw std::logic_error("cannot reset during a capture");
    if (g->captured) c10::cuda::device_synchronize();  // in-flight replays use the pool
    g->graph.reset();
    g->captured = false;
  });
}

}  // extern "C"
