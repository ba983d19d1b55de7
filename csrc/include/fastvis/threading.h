// fastvis: the core's threads (OpenMP regions or its own pool, see threading_backend).
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace fastvis {

// Number of threads the core uses (the caller's thread included). Python sets it
// from torch.get_num_threads() at import; native programs default to the
// hardware concurrency.
void set_num_threads(int n);
int get_num_threads();

// How parallel regions run: "openmp" (the OpenMP runtime's threads, shared with every other
// user of that runtime in the process, e.g. PyTorch) or "pool" (fastvis' own threads:
// builds without OpenMP, and processes forked after a region ran).
std::string threading_backend();

// Runs fn(begin, end) over [0, n) split into at most get_num_threads() contiguous
// chunks of at least `grain` items. The split depends only on n, grain and the
// thread count, so a kernel that writes disjoint outputs per index is deterministic.
// Calls from inside a running parallel region run serially on the calling thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// As parallel_for, and fn also receives its chunk's index (< get_num_threads()), e.g.
// to pick a per-thread slot of a caller-allocated scratch buffer.
void parallel_for_indexed(int64_t n, int64_t grain,
                          const std::function<void(int, int64_t, int64_t)>& fn);

}  // namespace fastvis
