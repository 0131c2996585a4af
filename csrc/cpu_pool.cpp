// torch.ops.fastlm.cpu_pool_stats: what the work-sharing pool of the CPU decode kernels (cpu_pool.h)
// has done in this process, for tests, `fastlm info`-style diagnostics and benchmarks;
// torch.ops.fastlm.cpu_pool_debug: the test hook that delays its helpers.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

#include "cpu_pool.h"

namespace fastlm {
namespace {

// [threads, helper_chunks, helpers_started, shared_jobs, stalls, backoff_jobs, wait_us]:
// at::get_num_threads() at the last call (the caller + the helpers it may use), chunks the helpers ran
// in the last shared job, helper threads started, jobs shared with helpers, shared jobs whose caller
// waited past the stall bound (FASTLM_POOL_STALL_US), jobs run on the caller alone in a back-off
// window, microseconds the caller spent waiting for chunks a helper had claimed (all jobs).
std::vector<int64_t> cpu_pool_stats() {
  const PoolStats s = SharePool::get().stats();
  return {s.threads,      s.helper_chunks, s.helpers_started, s.shared_jobs,       s.stalls,
          s.backoff_jobs, s.wait_us,       s.busy_backoffs,   s.run_delay_permille};
}

// Test hook: delays the pool's helpers (cpu_pool.h SharePool::debug). mode 0 off, 1: a helper sleeps
// `us` microseconds before it claims anything of a job (starts late), 2: after it claimed its first
// chunk of a job (descheduled while it holds work). Returns the previous [mode, us].
std::vector<int64_t> cpu_pool_debug(int64_t mode, int64_t us) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "cpu_pool_debug: mode must be 0 (off), 1 (helpers start late) or 2 "
                    "(helpers stop holding a chunk), got ", mode);
  TORCH_CHECK_VALUE(us >= 0 && us <= 10000000, "cpu_pool_debug: us must be in [0, 10000000], got ", us);
  return SharePool::get().debug(mode, us);
}

// Sets the calling thread's rows scope (cpu_pool.h: pool_rows_scope) to `on` (0 or 1) and returns
// the previous value, so a caller restores it.
int64_t cpu_pool_scope(int64_t on) {
  TORCH_CHECK_VALUE(on == 0 || on == 1, "cpu_pool_scope: on must be 0 or 1, got ", on);
  bool& s = pool_rows_scope();
  const int64_t prev = s ? 1 : 0;
  s = on == 1;
  return prev;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm, m) {
  m.def("cpu_pool_stats() -> int[]", &cpu_pool_stats);
  m.def("cpu_pool_scope(int on) -> int", &cpu_pool_scope);
  m.def("cpu_pool_debug(int mode, int us) -> int[]", &cpu_pool_debug);
}

}  // namespace fastlm
