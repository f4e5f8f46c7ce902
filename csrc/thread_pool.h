// A small persistent thread pool for the row loops, in place of OpenMP: the extension then needs
// no OpenMP runtime (libgomp is not on the manylinux allow-list, and bundling one beside the
// runtime torch loads puts two in one process). The caller passes the thread count (Python
// passes torch.get_num_threads()).
//
// One pool per process (an inline function's static is one object across the per-ISA objects).
// Callers on different threads take turns. A forked child starts a fresh pool: the parent's
// workers do not exist in it.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace mf {

class ThreadPool {
 public:
  // Runs fn(tid) for tid in [0, nt), the calling thread as tid 0, and returns when all are done.
  // Returns the number of threads that ran (less than nt only if threads could not be created).
  int run(int nt, const std::function<void(int)>& fn) {
    if (nt <= 1) {
      fn(0);
      return 1;
    }
    std::lock_guard<std::mutex> turn(run_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(workers_.size()) < nt - 1) {
        try {
          workers_.emplace_back(&ThreadPool::work, this, static_cast<int>(workers_.size()) + 1);
        } catch (const std::system_error&) {
          break;
        }
      }
      nt = std::min<int>(nt, static_cast<int>(workers_.size()) + 1);
      job_ = &fn;
      active_ = nt;
      pending_ = nt - 1;
      ++epoch_;
    }
    work_cv_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
    return nt;
  }

 private:
  void work(int tid) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      work_cv_.wait(lk, [&] { return epoch_ != seen; });
      seen = epoch_;
      if (tid >= active_) continue;
      const std::function<void(int)>* fn = job_;
      lk.unlock();
      (*fn)(tid);
      lk.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::vector<std::thread> workers_;  // never joined: the pool lives until the process exits
  const std::function<void(int)>* job_ = nullptr;
  uint64_t epoch_ = 0;
  int active_ = 0;
  int pending_ = 0;
};

struct PoolHolder {
  std::mutex mu;
  std::atomic<ThreadPool*> pool{nullptr};
  PoolHolder();
};

inline PoolHolder& pool_holder() {
  static PoolHolder h;
  return h;
}

// The child of a fork() has only the forking thread: drop (leak) the parent's pool, whose
// workers and locks are meaningless here, and start again on first use.
inline void pool_after_fork_child() {
  PoolHolder& h = pool_holder();
  h.pool.store(nullptr);
  new (&h.mu) std::mutex();
}

inline PoolHolder::PoolHolder() { pthread_atfork(nullptr, nullptr, &pool_after_fork_child); }

inline ThreadPool& thread_pool() {
  PoolHolder& h = pool_holder();
  ThreadPool* p = h.pool.load(std::memory_order_acquire);
  if (p) return *p;
  std::lock_guard<std::mutex> lk(h.mu);
  p = h.pool.load(std::memory_order_relaxed);
  if (!p) {
    p = new ThreadPool();
    h.pool.store(p, std::memory_order_release);
  }
  return *p;
}

}  // namespace mf
