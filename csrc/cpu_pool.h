// A work-sharing pool for the CPU decode kernels: the calling thread never waits for a helper
// to wake up, and stops sharing work while the machine is too busy for it to pay.
//
// at::parallel_for (OpenMP) splits the range statically and ends in a barrier, so a call returns
// only after every pool thread has been scheduled and has run its share. On a busy machine a
// descheduled helper costs a scheduler time slice per call (measured here: a 768 x 3072 fp32 GEMV
// went from ~0.2 ms to 12-16 ms per call with 2 threads while other processes held the cores).
// Here the range is cut into chunks claimed from one atomic counter: the caller claims chunks
// itself from the start, a helper that is awake claims the next ones, and the caller waits only
// for chunks a helper has already claimed and not yet finished. A job is complete when all its
// chunks are (a helper counts each chunk as it finishes it), not when the helpers have checked in:
// a helper that has not started, or wakes late, finds nothing left (or another job's generation in
// the counter, so no claim of the old job can succeed) and goes back to waiting, and the caller has
// run the whole job alone without waiting for it.
//
// Waiting, bounded spin then sleep (the scheme of OpenMP runtimes: KMP_BLOCKTIME, GOMP_SPINCOUNT):
// - a helper spins FASTLM_POOL_SPIN_US microseconds (default 100: the gap between consecutive ops
//   of a decode step) for the next job, then sleeps on a condition variable (futex) until one is
//   posted;
// - the caller, done with its own chunks, spins ~20 us for the helpers' last chunks, then sleeps on
//   a condition variable that the helper finishing the job signals.
// Under load (more runnable threads than cores) two threads can lose to one in two ways: a helper
// descheduled while it holds a claimed chunk makes the caller wait a scheduler time slice (~1-4 ms)
// for it (seen: decode time doubled with one competing process on a 2-core machine); and the helper,
// spinning between jobs, takes CPU time that the caller's serial work (attention, LayerNorms, the
// Python loop) then lacks (GPT-2 small int8 decode: 2 threads 1.1-1.3x slower than 1 under one
// competing process, with few stalls). The first is bounded:
// - Stall back-off: when the caller waits longer than FASTLM_POOL_STALL_US (default 1000 us) and 4x
//   its own time per chunk for a helper's chunk, the pool runs every job on the calling thread alone
//   for a back-off window (10 ms, doubling up to 320 ms while stalls recur right after a window; back
//   to 10 ms after 256 shared jobs without one), then shares work again (FASTLM_POOL_STALL_US=0
//   turns this off).
// - Busy back-off: every 20 ms of shared work the pool reads how long its threads (the caller and its
//   helpers) were runnable but waiting for a CPU (run_delay in /proc/self/task/<tid>/schedstat); when
//   that reaches FASTLM_POOL_BUSY_PCT percent of the window per thread (default 20; 0 turns it off),
//   more threads want the CPUs than there are, and the pool runs every job on the caller alone for a
//   window (20 ms, doubling up to 640 ms while the first window after one is still busy), then measures
//   again. This catches the second loss (a spinning helper taking the caller's CPU), which shows as run
//   queue waits rather than as stalls; an idle machine has next to no run_delay (a helper woken from
//   sleep waits microseconds), so nothing changes there.
// Run alone, the helpers sleep after their spin, so the caller has a core as one thread would. Idle
// cores do not stall, so nothing changes there. (A load probe that timed alone against shared when
// the caller was preempted, and ran the faster, was tried and removed: in a quiet A/B with one
// competing process it chose sharing in 2 of 3 loaded runs where 2 threads were slower than 1.)
//
// Threads: at::get_num_threads() - 1 helpers, read at every call, so torch.set_num_threads and
// OMP_NUM_THREADS / MKL_NUM_THREADS (which torch reads at start-up, and Ray and Spark set) size it
// (helpers are created on first use, detached, never destroyed; spare ones sleep). A call from
// inside a parallel region, from a second thread while a call is in flight, or after fork() runs
// its chunks serially on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define FASTLM_POOL_PAUSE() _mm_pause()
#else
#define FASTLM_POOL_PAUSE() std::this_thread::yield()
#endif

namespace fastlm {

// What the pool did (torch.ops.fastlm.cpu_pool_stats): for tests, docs and benchmarks.
struct PoolStats {
  int64_t threads = 0;        // at::get_num_threads() at the last call: the caller + helpers allowed
  int64_t helper_chunks = 0;  // chunks the helpers ran in the last shared job
  int64_t helpers_started = 0;
  int64_t shared_jobs = 0;    // jobs shared with helpers
  int64_t stalls = 0;         // shared jobs whose caller waited past the stall bound
  int64_t backoff_jobs = 0;   // jobs run on the caller alone in a back-off window
  int64_t wait_us = 0;        // time the caller spent waiting for chunks a helper had claimed
  int64_t busy_backoffs = 0;  // back-off windows started because the pool's threads waited for a CPU
  int64_t run_delay_permille = -1;  // in the last measured window: their run-queue wait / wall, per thread (-1: none yet)
};

// Rows scope of the calling thread (torch.ops.fastlm.cpu_pool_scope): while on, the row ops of
// ffn.cpp (LayerNorm, add + LayerNorm) share their rows through SharePool instead of an OpenMP
// region. A GPT-2 prefill whose GEMMs run on this pool turns it on: an OpenMP region between two
// pool jobs leaves libgomp's worker spinning (OMP_WAIT_POLICY unset: up to milliseconds) on the
// core the pool's helper needs next (measured: ~0.6 s more CPU per B = 32 GPT-2 small prefill on
// the 2-core Zen 4 than with OMP_WAIT_POLICY=PASSIVE; the 1-thread prefill is ~1.0 s).
inline bool& pool_rows_scope() {
  static thread_local bool on = false;
  return on;
}

class SharePool {
  using Clock = std::chrono::steady_clock;

 public:
  static SharePool& get() {
    static SharePool* p = new SharePool();  // leaked on purpose: detached helpers may outlive exit
    return *p;
  }

  // Runs fn(c) for every chunk c in [0, n), each exactly once, on the caller and up to
  // at::get_num_threads() - 1 helpers. fn must not throw.
  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    const int threads = at::get_num_threads();
    const int helpers = std::max(0, threads - 1);
    threads_.store(threads, std::memory_order_relaxed);
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (n == 1 || helpers == 0 || !busy.owns_lock() || at::in_parallel_region() || getpid() != pid_) {
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    const auto t0 = Clock::now();
    if (t0 < serial_until_) {  // stall back-off window: the machine is too busy for helpers to pay
      backoff_jobs_.fetch_add(1, std::memory_order_relaxed);
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    ensure_helpers(helpers);
    if (busy_permille_ > 0 && cpus_busy(t0, helpers)) {  // starts a back-off window: run this job alone too
      backoff_jobs_.fetch_add(1, std::memory_order_relaxed);
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    fn_.store(&fn, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    max_helpers_ = helpers;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (counter_.load(std::memory_order_relaxed) >> 32) + 1;
    counter_.store(gen << 32, std::memory_order_release);  // publishes fn_, n_, done_ = 0
    {
      std::lock_guard<std::mutex> l(wake_mutex_);
      gen_.store(static_cast<uint32_t>(gen), std::memory_order_release);
    }
    wake_cv_.notify_all();
    const int64_t mine = work(gen, false);
    const auto t1 = Clock::now();
    // chunks claimed by helpers are being run by threads that were running: spin briefly, then sleep
    bool waited = false;
    if (done_.load(std::memory_order_acquire) + mine < n) {
      waited = true;
      for (int i = 0; i < 2048 && done_.load(std::memory_order_acquire) + mine < n; ++i) FASTLM_POOL_PAUSE();
      if (done_.load(std::memory_order_acquire) + mine < n) {
        std::unique_lock<std::mutex> l(done_mutex_);
        waiting_.store(true, std::memory_order_seq_cst);
        // a helper adds to done_ (seq_cst) and then reads waiting_: it sees true, or we see its chunks
        while (done_.load(std::memory_order_seq_cst) + mine < n) done_cv_.wait_for(l, std::chrono::milliseconds(2));
        waiting_.store(false, std::memory_order_relaxed);
      }
    }
    shared_jobs_.fetch_add(1, std::memory_order_relaxed);
    helper_chunks_.store(n - mine, std::memory_order_relaxed);
    if (waited) {
      const auto t2 = Clock::now();
      wait_ns_.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(t2 - t1).count(),
                         std::memory_order_relaxed);
      if (stall_us_ > 0) judge(t0, t1, t2, mine);
      else ++clean_jobs_;
    } else {
      ++clean_jobs_;
    }
  }

  // Test hook (torch.ops.fastlm.cpu_pool_debug): mode 1 makes every helper sleep `us` after it sees a
  // new job and before it claims anything (a helper that starts late: the caller must finish the job
  // alone and not wait for it); mode 2 makes it sleep `us` after claiming its first chunk of a job and
  // before running it (a helper descheduled while it holds work: the caller waits for that chunk
  // only). 0 turns it off. Returns the previous {mode, us}.
  std::vector<int64_t> debug(int64_t mode, int64_t us) {
    std::vector<int64_t> prev = {debug_mode_.load(), debug_us_.load()};
    debug_us_.store(us);
    debug_mode_.store(static_cast<int>(mode));
    return prev;
  }

  PoolStats stats() const {
    PoolStats s;
    s.threads = threads_.load(std::memory_order_relaxed);
    s.helper_chunks = helper_chunks_.load(std::memory_order_relaxed);
    s.helpers_started = started_.load(std::memory_order_relaxed);
    s.shared_jobs = shared_jobs_.load(std::memory_order_relaxed);
    s.stalls = stalls_.load(std::memory_order_relaxed);
    s.backoff_jobs = backoff_jobs_.load(std::memory_order_relaxed);
    s.wait_us = wait_ns_.load(std::memory_order_relaxed) / 1000;
    s.busy_backoffs = busy_backoffs_.load(std::memory_order_relaxed);
    s.run_delay_permille = run_delay_permille_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  static constexpr std::chrono::milliseconds kBackoffMin{10}, kBackoffMax{320};
  static constexpr int64_t kCleanJobs = 256;  // shared jobs without a stall that reset the back-off
  static constexpr std::chrono::milliseconds kDelayWindow{20}, kBusyBackoffMin{20}, kBusyBackoffMax{640};
  static constexpr int kBusyPctDefault = 20;
  static constexpr int kMaxHelpers = 256;  // helpers whose thread ids the busy check reads

  SharePool() : pid_(getpid()) {
    const char* env = std::getenv("FASTLM_POOL_SPIN_US");
    spin_us_ = env != nullptr ? std::max(0, std::atoi(env)) : 100;
    env = std::getenv("FASTLM_POOL_STALL_US");
    stall_us_ = env != nullptr ? std::max(0, std::atoi(env)) : 1000;
    env = std::getenv("FASTLM_POOL_BUSY_PCT");
    busy_permille_ = env != nullptr ? 10 * std::clamp(std::atoi(env), 0, 100) : 10 * kBusyPctDefault;
  }

  // Called with run_mutex_ held after a job whose caller had to wait for helpers (t1 .. t2).
  void judge(Clock::time_point t0, Clock::time_point t1, Clock::time_point t2, int64_t mine) {
    const auto wait = t2 - t1;
    const auto own = mine > 0 ? (t1 - t0) / mine : Clock::duration::zero();  // the caller's time per chunk
    if (wait <= std::chrono::microseconds(stall_us_) || wait <= 4 * own) {
      ++clean_jobs_;
      return;
    }
    stalls_.fetch_add(1, std::memory_order_relaxed);
    enter_backoff(t2);
  }

  // Starts a back-off window at `now` (run_mutex_ held): 10 ms, doubling up to 320 ms while the
  // previous one ended less than kCleanJobs shared jobs ago.
  void enter_backoff(Clock::time_point now) {
    backoff_ = clean_jobs_ < kCleanJobs ? std::min<Clock::duration>(2 * backoff_, kBackoffMax) : Clock::duration(kBackoffMin);
    clean_jobs_ = 0;
    serial_until_ = now + backoff_;
  }

  // The busy check (run_mutex_ held, before a shared job at `now`): over windows of kDelayWindow wall
  // time while the pool shares work, the time its threads (this caller and the `helpers` it may use)
  // spent runnable but waiting for a CPU (run_delay of /proc/self/task/<tid>/schedstat, the
  // scheduler's own account: Documentation/scheduler/sched-stats.rst). When the average per thread
  // reaches busy_permille_ of the window, the machine has more runnable threads than CPUs for them
  // and every shared job waits on a preempted thread: starts a back-off window (runs this job alone
  // too) and returns true. Windows restart after a back-off, a change of caller thread or helper
  // count; reading the files costs ~10 us per window. Where schedstat cannot be read the check is off.
  bool cpus_busy(Clock::time_point now, int helpers) {
    const pid_t me = this_tid();
    int64_t delay = 0;
    if (!delay_armed_ || me != delay_caller_ || helpers != delay_helpers_) {
      if (!read_run_delay(me, helpers, &delay)) {  // a helper not started yet, or no schedstat
        int64_t own = 0;
        if (!thread_run_delay(me, &own)) busy_permille_ = 0;  // no schedstat (no /proc): off for good
        return false;
      }
      delay_armed_ = true;
      delay_caller_ = me;
      delay_helpers_ = helpers;
      delay_base_ = delay;
      delay_t0_ = now;
      return false;
    }
    if (now - delay_t0_ < kDelayWindow) return false;
    if (!read_run_delay(me, helpers, &delay)) {
      delay_armed_ = false;
      return false;
    }
    const int64_t wall = std::chrono::duration_cast<std::chrono::nanoseconds>(now - delay_t0_).count() * (helpers + 1);
    const int64_t permille = std::max<int64_t>(0, delay - delay_base_) * 1000 / std::max<int64_t>(1, wall);
    run_delay_permille_.store(permille, std::memory_order_relaxed);
    delay_base_ = delay;
    delay_t0_ = now;
    if (permille < busy_permille_) {
      ++busy_clean_windows_;
      return false;
    }
    busy_backoffs_.fetch_add(1, std::memory_order_relaxed);
    // 20 ms, doubling up to 640 ms while the machine is still busy in the first window after one
    busy_backoff_ = busy_clean_windows_ == 0 ? std::min<Clock::duration>(2 * busy_backoff_, kBusyBackoffMax)
                                             : Clock::duration(kBusyBackoffMin);
    busy_clean_windows_ = 0;
    serial_until_ = std::max(serial_until_, now + busy_backoff_);
    delay_armed_ = false;
    return true;
  }

  // Sum of run_delay (ns) of the caller `me` and helpers [0, helpers); false if one cannot be read.
  bool read_run_delay(pid_t me, int helpers, int64_t* sum) const {
    int64_t total = 0, d = 0;
    if (!thread_run_delay(me, &d)) return false;
    total += d;
    for (int i = 0; i < helpers && i < kMaxHelpers; ++i) {
      const pid_t t = helper_tids_[i].load(std::memory_order_acquire);
      if (t == 0 || !thread_run_delay(t, &d)) return false;
      total += d;
    }
    *sum = total;
    return true;
  }

  // /proc/self/task/<tid>/schedstat: "<ns on cpu> <ns waiting on a run queue> <timeslices>".
  static bool thread_run_delay(pid_t tid, int64_t* out) {
    char path[64], buf[128];
    std::snprintf(path, sizeof(path), "/proc/self/task/%d/schedstat", static_cast<int>(tid));
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    const ssize_t len = ::read(fd, buf, sizeof(buf) - 1);
    ::close(fd);
    if (len <= 0) return false;
    buf[len] = 0;
    long long on_cpu = 0, waited = 0;
    if (std::sscanf(buf, "%lld %lld", &on_cpu, &waited) != 2) return false;
    *out = waited;
    return true;
  }

  static pid_t this_tid() {
    static thread_local const pid_t tid = static_cast<pid_t>(::syscall(SYS_gettid));
    return tid;
  }

  void ensure_helpers(int helpers) {
    while (started_.load(std::memory_order_relaxed) < helpers) {
      const int idx = started_.fetch_add(1, std::memory_order_relaxed);
      std::thread([this, idx] { helper_loop(idx); }).detach();
    }
  }

  // Claims and runs chunks of job `gen` until none is left; returns how many this thread ran.
  // The caller counts its own; a helper adds each chunk to done_ as soon as it has run it (and wakes
  // the caller if it sleeps), so the job is complete when its last chunk is, whatever the helper does
  // next (a helper descheduled between two chunks holds nothing up).
  int64_t work(uint64_t gen, bool helper) {
    int64_t ran = 0;
    uint64_t v = counter_.load(std::memory_order_acquire);
    for (;;) {
      if ((v >> 32) != gen || static_cast<int64_t>(v & 0xffffffffu) >= n_local(v, gen)) break;
      if (!counter_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // claimed chunk (v & mask) of job gen: the job cannot change until it is done
      if (helper && ran == 0 && debug_mode_.load(std::memory_order_relaxed) == 2) debug_sleep();
      (*fn_.load(std::memory_order_relaxed))(static_cast<int64_t>(v & 0xffffffffu));
      ++ran;
      if (helper) {
        // after this the caller may finish the job and post the next: nothing of job gen is touched again
        done_.fetch_add(1, std::memory_order_seq_cst);
        if (waiting_.load(std::memory_order_seq_cst)) {  // the caller sleeps (or is about to): wake it
          std::lock_guard<std::mutex> l(done_mutex_);
          done_cv_.notify_one();
        }
      }
      v = counter_.load(std::memory_order_acquire);
    }
    return ran;
  }

  void debug_sleep() const {
    std::this_thread::sleep_for(std::chrono::microseconds(debug_us_.load(std::memory_order_relaxed)));
  }

  // n_ of job gen when the counter still says gen (read after the acquire load of the counter;
  // if the job has moved on, the next CAS fails on the generation bits).
  int64_t n_local(uint64_t v, uint64_t gen) const { return (v >> 32) == gen ? n_.load(std::memory_order_relaxed) : 0; }

  void helper_loop(int idx) {
    if (idx < kMaxHelpers) helper_tids_[idx].store(this_tid(), std::memory_order_release);
    uint32_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      uint32_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        const auto t0 = Clock::now();
        const auto spin = std::chrono::microseconds(spin_us_);
        int i = 0;
        while ((g = gen_.load(std::memory_order_acquire)) == seen) {
          FASTLM_POOL_PAUSE();
          if ((++i & 255) == 0 && Clock::now() - t0 > spin) break;
        }
        if (g == seen) {
          std::unique_lock<std::mutex> l(wake_mutex_);
          wake_cv_.wait(l, [&] { return (g = gen_.load(std::memory_order_acquire)) != seen; });
        }
      }
      seen = g;
      if (idx >= max_helpers_.load(std::memory_order_relaxed)) continue;
      if (debug_mode_.load(std::memory_order_relaxed) == 1) debug_sleep();
      // a helper that comes late finds job g over (another generation in the counter, or no chunk
      // left) and claims nothing: the caller never waits for a helper that has not claimed a chunk
      const uint64_t v = counter_.load(std::memory_order_acquire);
      if (static_cast<uint32_t>(v >> 32) != g) continue;  // that job is over
      work(v >> 32, true);
    }
  }

  const pid_t pid_;
  int spin_us_ = 100;
  int stall_us_ = 1000;
  int busy_permille_ = 10 * kBusyPctDefault;
  std::atomic<int> started_{0};  // helpers started (written under run_mutex_)
  std::mutex run_mutex_;
  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;
  std::mutex done_mutex_;
  std::condition_variable done_cv_;
  std::atomic<bool> waiting_{false};  // the caller sleeps on done_cv_
  std::atomic<uint32_t> gen_{0};
  std::atomic<uint64_t> counter_{0};  // generation << 32 | next chunk
  std::atomic<int64_t> done_{0};      // chunks finished by helpers in the current job
  std::atomic<int> max_helpers_{0};
  // the current job (written before the counter's release store, read after a claim)
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_{0};
  // contention back-off (guarded by run_mutex_)
  Clock::time_point serial_until_{};
  Clock::duration backoff_{kBackoffMin};
  int64_t clean_jobs_ = 0;
  // busy check (guarded by run_mutex_)
  std::atomic<pid_t> helper_tids_[kMaxHelpers] = {};
  bool delay_armed_ = false;
  pid_t delay_caller_ = 0;
  int delay_helpers_ = 0;
  int64_t delay_base_ = 0;
  Clock::time_point delay_t0_{};
  Clock::duration busy_backoff_{kBusyBackoffMin};
  int64_t busy_clean_windows_ = 0;
  // stats
  std::atomic<int64_t> threads_{0}, helper_chunks_{0}, shared_jobs_{0}, stalls_{0}, backoff_jobs_{0}, wait_ns_{0};
  std::atomic<int64_t> busy_backoffs_{0}, run_delay_permille_{-1};
  // test hook (debug())
  std::atomic<int> debug_mode_{0};
  std::atomic<int64_t> debug_us_{0};
};

}  // namespace fastlm
