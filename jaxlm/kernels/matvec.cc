// y[N] = x[K] . W[K, N] in float32, for batch-1 decode on CPU (an XLA FFI custom call).
//
// Why: a decode step at batch 1 is ~41 matrix-vector products that stream the weights from DRAM.
// XLA:CPU's library calls (Eigen, XNNPACK, oneDNN) reach 18-25 GB/s on the per-layer sizes
// (1.5-3 MB) of the bench config, against ~31 GB/s that the two cores can stream; this kernel
// reaches ~30 GB/s in the same chain (see jaxlm/kernels/matvec.py).
//
// How: the K rows of W are split into contiguous blocks, one per participant (the calling thread
// and one task per extra thread of XLA's intra-op pool), so each participant streams one block
// front to back into its own [N] accumulator (the caller's is y itself); the caller then adds the
// others into y. A block
// whose task has not started when the caller finishes its own is claimed and run by the caller,
// so a busy pool delays the call but can never deadlock it.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void spin_pause() { _mm_pause(); }
#else
static inline void spin_pause() {}
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// acc[0:n] = sum over k in [k0, k1) of x[k] * w[k, 0:n]. Four rows per pass over acc, so acc
// (L1/L2-resident) is read and written once per four weight rows.
void accumulate_rows(const float* __restrict__ x, const float* __restrict__ w, int64_t k0,
                     int64_t k1, int64_t n, float* __restrict__ acc) {
  std::memset(acc, 0, n * sizeof(float));
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float a0 = x[k], a1 = x[k + 1], a2 = x[k + 2], a3 = x[k + 3];
    const float* __restrict__ r0 = w + k * n;
    const float* __restrict__ r1 = r0 + n;
    const float* __restrict__ r2 = r1 + n;
    const float* __restrict__ r3 = r2 + n;
    for (int64_t j = 0; j < n; ++j) acc[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j];
  }
  for (; k < k1; ++k) {
    const float a = x[k];
    const float* __restrict__ r = w + k * n;
    for (int64_t j = 0; j < n; ++j) acc[j] += a * r[j];
  }
}

enum : int { kPending = 0, kClaimed = 1, kDone = 2 };

// Shared by the caller and the pool tasks; a task that runs after the call returned (its block
// claimed by the caller) only touches `status`, which the shared_ptr keeps alive.
struct Call {
  const float* x;
  const float* w;
  int64_t k, n;
  int parts;
  float* y;                                    // block 0's accumulator: the result itself
  std::unique_ptr<float[]> acc;                // [parts - 1, n]: blocks 1.., written before read
  std::unique_ptr<std::atomic<int>[]> status;  // per block

  float* out(int p) { return p == 0 ? y : acc.get() + (p - 1) * n; }
  void run(int p) { accumulate_rows(x, w, k * p / parts, k * (p + 1) / parts, n, out(p)); }
  bool claim(int p) {
    int expected = kPending;
    return status[p].compare_exchange_strong(expected, kClaimed, std::memory_order_acq_rel);
  }
};

constexpr int kMaxParts = 8;        // DRAM bandwidth saturates well before this many threads
constexpr int64_t kMinRows = 16;    // rows per block; fewer and the call overhead dominates

ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  auto dims = w.dimensions();
  if (dims.size() != 2 || x.element_count() != dims[0] || y->element_count() != dims[1]) {
    return ffi::Error::InvalidArgument("jaxlm_matvec_f32: expects x [K], w [K, N] -> y [N]");
  }
  const int64_t k = dims[0], n = dims[1];
  int64_t parts = pool.num_threads();
  if (parts > kMaxParts) parts = kMaxParts;
  if (parts > k / kMinRows) parts = k / kMinRows;
  if (parts < 1) parts = 1;

  auto call = std::make_shared<Call>();
  call->x = x.typed_data();
  call->w = w.typed_data();
  call->k = k;
  call->n = n;
  call->parts = static_cast<int>(parts);
  call->y = y->typed_data();
  call->acc.reset(new float[(parts - 1) * n]);  // uninitialised: accumulate_rows zeroes each block
  call->status.reset(new std::atomic<int>[parts]);
  for (int p = 0; p < parts; ++p) call->status[p].store(kPending, std::memory_order_relaxed);

  for (int p = 1; p < parts; ++p) {
    pool.Schedule([call, p] {
      if (call->claim(p)) {
        call->run(p);
        call->status[p].store(kDone, std::memory_order_release);
      }
    });
  }
  call->run(0);
  for (int p = 1; p < parts; ++p) {
    if (call->claim(p)) {
      call->run(p);  // its task has not started: do it here
    } else {
      // The block is running on a pool thread: wait, giving the core away now and then in
      // case that thread shares it with us (more threads than cores).
      for (int spins = 1; call->status[p].load(std::memory_order_acquire) != kDone; ++spins) {
        if (spins % 1024 == 0) std::this_thread::yield(); else spin_pause();
      }
    }
  }

  float* out = call->y;
  for (int p = 1; p < parts; ++p) {
    const float* a = call->out(p);
    for (int64_t j = 0; j < n; ++j) out[j] += a[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxlm_matvec_f32, MatVec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N]
);
