// The core's parallel regions: static contiguous chunks, one per thread.
//
// Built with OpenMP (FASTVIS_OPENMP, the default), a region is an OpenMP parallel region.
// In a PyTorch process the core then runs on PyTorch's own OpenMP runtime (torch's
// libgomp.so.1 is already loaded under that soname, so the loader binds the core to it):
// one team of threads for both. With a pool of its own, PyTorch's workers, which spin for
// a while after every PyTorch op, competed with fastvis' for the cores: in-process A/B on
// 2 cores, convnext_tiny inference 118 -> 112 ms (N=1) and 679 -> 560 ms (N=8), training
// step 573 -> 500 ms (N=1), unireplknet_t training step 742 -> 535 ms (N=1).
//
// Otherwise, and in a child forked after the parent ran a region (GNU libgomp hangs there),
// the core's own pool: persistent workers, the calling thread takes chunk 0, re-created
// lazily after fork.
#include "fastvis/threading.h"

#include <pthread.h>

#include <algorithm>
#include <new>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <string>
#include <vector>

#include "fastvis/error.h"

#if defined(FASTVIS_WITH_OPENMP)
#include <omp.h>
#endif

namespace fastvis {
namespace {

thread_local bool t_in_parallel = false;

class Pool {
 public:
  explicit Pool(int nthreads) : nthreads_(nthreads) {
    for (int i = 1; i < nthreads_; ++i) workers_.emplace_back([this, i] { worker(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      stop_flag_.store(true, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return nthreads_; }

  // Runs task(chunk) for chunk in [0, nchunks), nchunks <= size().
  void run(int nchunks, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> run_lock(run_mu_);  // one parallel region at a time
    {
      std::lock_guard<std::mutex> lk(mu_);
      task_ = &task;
      nchunks_ = nchunks;
      pending_.store(nchunks - 1, std::memory_order_relaxed);
      error_ = nullptr;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_relaxed) > 0) cv_.notify_all();
    run_chunk(0);
    // The other chunks usually finish within microseconds of this one: spin first, as a
    // futex sleep and wake-up costs tens of microseconds on a virtual machine.
    if (!spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    std::lock_guard<std::mutex> lk(mu_);
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Polls pred for about kSpinMicros, pausing the core between polls and yielding it
  // now and then (so a spinning worker does not starve a runnable thread on a small
  // machine). True if pred came true.
  template <class Pred> static bool spin_until(Pred pred) {
    constexpr int64_t kSpinMicros = 200;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 1;; ++i) {
      if (pred()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((i & 255) == 0) {
        if (std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicros))
          return pred();
        std::this_thread::yield();
      }
    }
  }

  void run_chunk(int chunk) {
    t_in_parallel = true;
    try {
      (*task_)(chunk);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
    }
    t_in_parallel = false;
  }
  void worker(int id) {
    uint64_t seen = 0;
    for (;;) {
      // Spin for the next region (back-to-back kernels), then sleep on the condition.
      if (!spin_until([&] {
            return stop_flag_.load(std::memory_order_acquire) ||
                   generation_.load(std::memory_order_acquire) != seen;
          })) {
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_.fetch_add(1, std::memory_order_relaxed);
        cv_.wait(lk, [&] { return stop_ || generation_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_relaxed);
      }
      int nchunks;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) return;
        seen = generation_.load(std::memory_order_acquire);
        nchunks = nchunks_;
      }
      if (id >= nchunks) continue;
      run_chunk(id);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller may be between check and wait
        done_cv_.notify_one();
      }
    }
  }

  int nthreads_;
  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* task_ = nullptr;
  int nchunks_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};  // workers blocked on cv_ (0: the notify can be skipped)
  bool stop_ = false;             // guarded by mu_
  std::atomic<bool> stop_flag_{false};  // stop_, readable while spinning
  std::exception_ptr error_;
};

std::mutex g_mu;
Pool* g_pool = nullptr;
int g_requested = 0;  // 0: hardware concurrency

// Read once: std::thread::hardware_concurrency() reads /sys on Linux (~8 us a call).
int default_threads() {
  static const int hc = [] {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
  }();
  return hc;
}

#if defined(FASTVIS_WITH_OPENMP)
// GNU libgomp cannot start a parallel region in a child forked after the parent ran one
// (the child hangs), so a forked child runs on the process's own pool instead.
bool g_forked = false;
bool openmp_usable() { return !g_forked; }
#endif

void after_fork_in_child() {
#if defined(FASTVIS_WITH_OPENMP)
  g_forked = true;
#endif
  // The workers did not survive the fork; forget the pool (leaking it is the only
  // safe option: its mutexes may be held) and build a new one on next use.
  g_pool = nullptr;
  new (&g_mu) std::mutex();
}

void register_atfork() {
  static bool registered = [] {
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
    return true;
  }();
  (void)registered;
}

Pool* get_pool() {
  register_atfork();
  std::lock_guard<std::mutex> lk(g_mu);
  int want = g_requested > 0 ? g_requested : default_threads();
  if (g_pool == nullptr || g_pool->size() != want) {
    delete g_pool;
    g_pool = new Pool(want);
  }
  return g_pool;
}

}  // namespace

void set_num_threads(int n) {
  FV_CHECK_VALUE(n >= 1, "set_num_threads: expected a thread count >= 1, got ", n);
  FV_CHECK_VALUE(n <= 4096, "set_num_threads: thread count ", n, " is unreasonably large");
  std::lock_guard<std::mutex> lk(g_mu);
  g_requested = n;
}

int get_num_threads() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_requested > 0 ? g_requested : default_threads();
}

void parallel_for_indexed(int64_t n, int64_t grain,
                          const std::function<void(int, int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int nt = get_num_threads();
  int64_t max_chunks = (n + grain - 1) / grain;
  int nchunks = static_cast<int>(std::min<int64_t>(nt, max_chunks));
  if (nchunks <= 1 || t_in_parallel) {
    fn(0, 0, n);
    return;
  }
  auto chunk = [&](int c, int nc) {
    const int64_t base = n / nc, rem = n % nc;
    int64_t begin = c * base + std::min<int64_t>(c, rem);
    int64_t end = begin + base + (c < rem ? 1 : 0);
    if (begin < end) fn(c, begin, end);
  };
#if defined(FASTVIS_WITH_OPENMP)
  register_atfork();
  if (openmp_usable()) {
    std::exception_ptr error;
    std::mutex error_mu;
#pragma omp parallel num_threads(nchunks)
    {
      // The team can be smaller than asked (thread limits): each thread then runs every
      // team-th chunk. Chunk boundaries depend on nchunks only.
      const int team = omp_get_num_threads();
      t_in_parallel = true;
      for (int c = omp_get_thread_num(); c < nchunks; c += team) {
        try {
          chunk(c, nchunks);
        } catch (...) {
          std::lock_guard<std::mutex> lk(error_mu);
          if (!error) error = std::current_exception();
        }
      }
      t_in_parallel = false;
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  Pool* pool = get_pool();
  nchunks = std::min(nchunks, pool->size());
  std::function<void(int)> task = [&](int c) { chunk(c, nchunks); };
  pool->run(nchunks, task);
}

std::string threading_backend() {
#if defined(FASTVIS_WITH_OPENMP)
  if (openmp_usable()) return "openmp";
#endif
  return "pool";
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  parallel_for_indexed(n, grain, [&](int, int64_t b, int64_t e) { fn(b, e); });
}

}  // namespace fastvis
