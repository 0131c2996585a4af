// A work-sharing pool for the CPU decode kernels: the calling thread never waits for a helper
// to wake up.
//
// at::parallel_for (OpenMP) splits the range statically and ends in a barrier, so a call returns
// only after every pool thread has been scheduled and has run its share. On a busy machine a
// descheduled helper costs a scheduler time slice per call (measured here: a 768 x 3072 fp32 GEMV
// went from ~0.2 ms to 12-16 ms per call with 2 threads while other processes held the cores).
// Here the range is cut into chunks claimed from one atomic counter: the caller claims chunks
// itself from the start, a helper that is awake claims the next ones, and the caller waits only
// for chunks a helper has already claimed (a running thread). A helper that wakes late finds
// nothing left and goes back to waiting. Helpers spin for FASTLM_POOL_SPIN_US microseconds
// (default 100: consecutive ops of a decode step) and then sleep on a condition variable.
//
// Threads: at::get_num_threads() - 1 helpers at most (created on first use, detached, never
// destroyed). A call from inside a parallel region, from a second thread while a call is in
// flight, or after fork() runs its chunks serially on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <unistd.h>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define FASTLM_POOL_PAUSE() _mm_pause()
#else
#define FASTLM_POOL_PAUSE() std::this_thread::yield()
#endif

namespace fastlm {

class SharePool {
 public:
  static SharePool& get() {
    static SharePool* p = new SharePool();  // leaked on purpose: detached helpers may outlive exit
    return *p;
  }

  // Runs fn(c) for every chunk c in [0, n), each exactly once, on the caller and up to
  // at::get_num_threads() - 1 helpers. fn must not throw.
  void run(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 0) return;
    const int helpers = std::max(0, at::get_num_threads() - 1);
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (n == 1 || helpers == 0 || !busy.owns_lock() || at::in_parallel_region() || getpid() != pid_) {
      for (int64_t c = 0; c < n; ++c) fn(c);
      return;
    }
    ensure_helpers(helpers);
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
    const int64_t mine = work(gen);
    // chunks claimed by helpers are being run by threads that are running: wait for them
    int64_t spins = 0;
    while (done_.load(std::memory_order_acquire) + mine < n) {
      if (++spins < 4096) FASTLM_POOL_PAUSE();
      else std::this_thread::yield();
    }
  }

 private:
  SharePool() : pid_(getpid()) {
    const char* env = std::getenv("FASTLM_POOL_SPIN_US");
    spin_us_ = env != nullptr ? std::max(0, std::atoi(env)) : 100;
  }

  void ensure_helpers(int helpers) {
    while (started_ < helpers) {
      const int idx = started_++;
      std::thread([this, idx] { helper_loop(idx); }).detach();
    }
  }

  // Claims and runs chunks of job `gen` until none is left; returns how many this thread ran.
  // The caller counts its own; helpers add theirs to done_.
  int64_t work(uint64_t gen) {
    int64_t ran = 0;
    uint64_t v = counter_.load(std::memory_order_acquire);
    for (;;) {
      if ((v >> 32) != gen || static_cast<int64_t>(v & 0xffffffffu) >= n_local(v, gen)) break;
      if (!counter_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // claimed chunk (v & mask) of job gen: the job cannot change until it is done
      (*fn_.load(std::memory_order_relaxed))(static_cast<int64_t>(v & 0xffffffffu));
      ++ran;
      v = counter_.load(std::memory_order_acquire);
    }
    return ran;
  }

  // n_ of job gen when the counter still says gen (read after the acquire load of the counter;
  // if the job has moved on, the next CAS fails on the generation bits).
  int64_t n_local(uint64_t v, uint64_t gen) const { return (v >> 32) == gen ? n_.load(std::memory_order_relaxed) : 0; }

  void helper_loop(int idx) {
    uint32_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      uint32_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        const auto t0 = std::chrono::steady_clock::now();
        const auto spin = std::chrono::microseconds(spin_us_);
        int i = 0;
        while ((g = gen_.load(std::memory_order_acquire)) == seen) {
          FASTLM_POOL_PAUSE();
          if ((++i & 255) == 0 && std::chrono::steady_clock::now() - t0 > spin) break;
        }
        if (g == seen) {
          std::unique_lock<std::mutex> l(wake_mutex_);
          wake_cv_.wait(l, [&] { return (g = gen_.load(std::memory_order_acquire)) != seen; });
        }
      }
      seen = g;
      if (idx >= max_helpers_.load(std::memory_order_relaxed)) continue;
      const uint64_t v = counter_.load(std::memory_order_acquire);
      if (static_cast<uint32_t>(v >> 32) != g) continue;  // that job is over
      const int64_t ran = work(v >> 32);
      if (ran > 0) done_.fetch_add(ran, std::memory_order_acq_rel);
    }
  }

  const pid_t pid_;
  int spin_us_ = 100;
  int started_ = 0;  // helpers started (guarded by run_mutex_)
  std::mutex run_mutex_;
  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;
  std::atomic<uint32_t> gen_{0};
  std::atomic<uint64_t> counter_{0};  // generation << 32 | next chunk
  std::atomic<int64_t> done_{0};      // chunks finished by helpers in the current job
  std::atomic<int> max_helpers_{0};
  // the current job (written before the counter's release store, read after a claim)
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_{0};
};

}  // namespace fastlm
