// The core's thread pool: persistent workers, static contiguous chunks, the
// calling thread takes chunk 0. One pool per process, re-created lazily after fork.
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
#include <vector>

#include "fastvis/error.h"

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

void after_fork_in_child() {
  // The workers did not survive the fork; forget the pool (leaking it is the only
  // safe option: its mutexes may be held) and build a new one on next use.
  g_pool = nullptr;
  new (&g_mu) std::mutex();
}

Pool* get_pool() {
  static bool registered = [] {
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
    return true;
  }();
  (void)registered;
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
  Pool* pool = get_pool();
  nchunks = std::min(nchunks, pool->size());
  const int64_t base = n / nchunks, rem = n % nchunks;
  std::function<void(int)> task = [&](int c) {
    int64_t begin = c * base + std::min<int64_t>(c, rem);
    int64_t end = begin + base + (c < rem ? 1 : 0);
    if (begin < end) fn(c, begin, end);
  };
  pool->run(nchunks, task);
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  parallel_for_indexed(n, grain, [&](int, int64_t b, int64_t e) { fn(b, e); });
}

}  // namespace fastvis
