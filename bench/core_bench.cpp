// Benchmarks of the pyarraypool core (csrc/core), without Python, with
// Google Benchmark.
//
// `make core-bench` builds this file and runs it, writing the results to
// build/core_bench.json as well as to the terminal. Every benchmark is
// repeated (Repetitions) and reports only its aggregates, of which the
// median is the number to read.
//
//   BM_AllocFree/<size>/<live>      allocate + free of one block of <size>
//                                   payload bytes on an Allocator over heap
//                                   memory, with <live> other blocks live
//   BM_PoolAllocFree/<size>/<live>  the same through Pool::allocate/release
//                                   in Mode::kFast (pool lock included) on a
//                                   real shared-memory pool
//   BM_LockUncontended/...          futex_lock try_lock or lock + unlock
//   BM_LockContendedThreads         two threads, one lock word
//   BM_LockContendedProcesses       two processes, one lock word (a forked
//                                   child hammers it; the parent measures)
//   BM_PoolAllocFreeOneProcess      1 KiB allocate + release pairs on a pool,
//   BM_PoolAllocFreeTwoProcesses    by one process / by two at once
//                                   (items_per_second counts both)
//   BM_MixedRandom                  random allocate / free traffic
//
// The benchmarks with a second thread or process also report cpus_used
// (2.0: both ran all the time; less: the machine was busy with other work
// and the numbers compare badly), CPU time per operation, futex sleeps and
// preemptions.
//
// The <live> blocks are made in setup: <live> + <live>/4 blocks of random
// payload sizes in [64, 256] bytes, then a random quarter of them is freed,
// so that the free lists hold many small holes besides the large remainder.
// That setup is built once per <live> and shared by the sizes (an allocate +
// free pair leaves the chain as it found it).
//
// Every pool is made with a fresh random token and left at the end; forked
// children leave their pool, _exit and are waited for; nothing may remain in
// /dev/shm afterwards (the program checks its tokens at exit and fails if
// one is).

#include <benchmark/benchmark.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "core/errors.hpp"
#include "core/futex_lock.hpp"
#include "core/pool.hpp"
#include "core/shm_segment.hpp"
#include "tests/child_process.hpp"

using namespace pap;

namespace {

constexpr int kReps = 5;
constexpr uint64_t KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;

// Every pool token this program made, checked for leftovers at the end.
std::vector<std::string> g_tokens;

std::string new_token() {
  g_tokens.push_back(random_token());
  return g_tokens.back();
}

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// A probe that never declares an owner dead: every owner here is alive.
class AlwaysAlive : public OwnerProbe {
 public:
  bool owner_alive(uint32_t) override { return true; }
};

// Runs `body`; a failure marks the benchmark as errored instead of ending
// the program (which would leave pools behind in /dev/shm).
template <class F>
void guarded(benchmark::State& state, F&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// ----------------------------------------------------------- shared memory

// An anonymous MAP_SHARED mapping holding one T, shared with forked children.
template <class T>
class SharedObj {
 public:
  SharedObj() {
    void* p = ::mmap(nullptr, sizeof(T), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    obj_ = new (p) T();
  }
  ~SharedObj() {
    obj_->~T();
    ::munmap(obj_, sizeof(T));
  }
  SharedObj(const SharedObj&) = delete;
  SharedObj& operator=(const SharedObj&) = delete;
  T* operator->() { return obj_; }
  T& operator*() { return *obj_; }

 private:
  T* obj_;
};

// What the calling thread has used so far: CPU time, and context switches
// (voluntary ones are futex sleeps here; involuntary ones are preemptions,
// by the other process or by anything else running on the machine).
struct Usage {
  uint64_t ops = 0;
  uint64_t cpu_ns = 0;
  uint64_t vol_cs = 0;
  uint64_t invol_cs = 0;
  Usage operator-(const Usage& o) const {
    return {ops - o.ops, cpu_ns - o.cpu_ns, vol_cs - o.vol_cs, invol_cs - o.invol_cs};
  }
  Usage operator+(const Usage& o) const {
    return {ops + o.ops, cpu_ns + o.cpu_ns, vol_cs + o.vol_cs, invol_cs + o.invol_cs};
  }
};

Usage thread_usage(uint64_t ops) {
  timespec ts;
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  rusage ru;
  ::getrusage(RUSAGE_THREAD, &ru);
  return {ops,
          static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec),
          static_cast<uint64_t>(ru.ru_nvcsw), static_cast<uint64_t>(ru.ru_nivcsw)};
}

// What a benchmark shares with its forked child.
struct alignas(64) ChildControl {
  alignas(64) LockWord lock{0};
  uint64_t counter = 0;  // guarded by `lock`
  alignas(64) std::atomic<uint32_t> ready{0};
  std::atomic<uint32_t> stop{0};
  // The parent's measured window: it sets `phase` to 1 before its loop and
  // to 2 after; the child notes its usage at each change and acknowledges
  // in `ack`.
  std::atomic<uint32_t> phase{0};
  alignas(64) std::atomic<uint32_t> ack{0};
  Usage at[3];
};

// The child's side: runs `op` until told to stop, noting its usage when the
// parent's window opens and closes.
template <class F>
void child_loop(ChildControl* c, F&& op) {
  c->ready.store(1, std::memory_order_release);
  uint64_t n = 0;
  uint32_t seen = 0;
  while (!c->stop.load(std::memory_order_relaxed)) {
    const uint32_t ph = c->phase.load(std::memory_order_acquire);
    if (ph != seen && ph < 3) {
      c->at[ph] = thread_usage(n);
      c->ack.store(ph, std::memory_order_release);
      seen = ph;
    }
    op();
    ++n;
  }
}

// Reports the window's usage of the parent (`parent`) and the child (`child`,
// zero without a child) as counters: how many CPUs the two kept busy
// (2.0 = both running all the time; much less means the machine was busy
// with other work), CPU time per operation, futex sleeps per 1000
// operations and preemptions per second.
void usage_counters(benchmark::State& state, const Usage& parent, const Usage& child) {
  const Usage both = parent + child;
  const double ops = std::max(static_cast<double>(both.ops), 1.0);
  state.counters["child_ops_per_second"] =
      benchmark::Counter(static_cast<double>(child.ops), benchmark::Counter::kIsRate);
  state.counters["cpus_used"] =
      benchmark::Counter(static_cast<double>(both.cpu_ns) * 1e-9, benchmark::Counter::kIsRate);
  state.counters["cpu_ns_per_op"] = static_cast<double>(both.cpu_ns) / ops;
  state.counters["sleeps_per_kop"] = 1000.0 * static_cast<double>(both.vol_cs) / ops;
  state.counters["preemptions_per_second"] =
      benchmark::Counter(static_cast<double>(both.invol_cs), benchmark::Counter::kIsRate);
}

// Forks a child running `body` and _exit()ing with its return value. The
// child dies with the parent and never outlives a hung run for long.
pid_t spawn(const std::function<int()>& body) {
  const pid_t pid = pap::test::fork_child(body, {120, true, "core_bench child"});
  if (pid < 0) throw std::runtime_error(std::string("fork failed: ") + std::strerror(errno));
  return pid;
}

using pap::test::wait_child;

// Stops the child of `ctl` and waits for it, also when the benchmark body
// throws.
class ChildGuard {
 public:
  ChildGuard(ChildControl& ctl, pid_t pid) : ctl_(ctl), pid_(pid) {}
  ~ChildGuard() {
    if (pid_ > 0) finish();
  }
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  // Waits until the child is ready (or gone); false if it failed.
  bool wait_ready() {
    while (!ctl_.ready.load(std::memory_order_acquire)) {
      int st;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      ::usleep(100);
    }
    return true;
  }
  // Moves the child to `phase` and waits for its acknowledgement.
  bool to_phase(uint32_t phase) {
    ctl_.phase.store(phase, std::memory_order_release);
    while (ctl_.ack.load(std::memory_order_acquire) != phase) {
      int st;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
    }
    return true;
  }
  int finish() {
    ctl_.stop.store(1, std::memory_order_release);
    int rc = wait_child(pid_);
    pid_ = -1;
    return rc;
  }

 private:
  ChildControl& ctl_;
  pid_t pid_;
};

// ---------------------------------------------------------------- fixtures

// An AllocState and one segment in private anonymous memory (the "heap"),
// laid out as a pool lays them out in shared memory. Without `prefault`,
// pages are faulted in where headers are first written; with it, all of
// them are faulted in up front, so that the measured loop pays no page
// faults (as a pool that has written its arrays' payloads does not).
class HeapArena {
 public:
  HeapArena(uint64_t segment_bytes, bool prefault) {
    const uint64_t at = round_up(sizeof(AllocState), 4096);
    bytes_ = at + round_up(segment_bytes, 4096);
    void* p =
        ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (prefault ? MAP_POPULATE : 0), -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    region_ = static_cast<unsigned char*>(p);
    state_ = new (region_) AllocState();
    span_ = SegmentSpan{region_ + at, round_up(segment_bytes, 4096)};
    Allocator a = alloc();
    a.reset();
    a.format_segment(0);
    a.add_segment(0);
  }
  ~HeapArena() { ::munmap(region_, bytes_); }
  HeapArena(const HeapArena&) = delete;
  HeapArena& operator=(const HeapArena&) = delete;

  // One segment; any key for the block check (nothing here is shared).
  Allocator alloc() { return Allocator(*state_, &span_, 1, 0x5EC7E7u); }

 private:
  unsigned char* region_ = nullptr;
  uint64_t bytes_ = 0;
  AllocState* state_ = nullptr;
  SegmentSpan span_{};
};

// Payload sizes of the background blocks: uniform in [64, 256] bytes.
uint64_t background_size(std::mt19937_64& rng) { return 64 + rng() % 193; }

// The <live> background blocks in heap memory, built for one <live> at a
// time (the previous one is dropped first).
struct HeapFixture {
  int64_t live = -1;
  std::unique_ptr<HeapArena> arena;
  uint64_t next_gen = 1;
};
HeapFixture g_heap;

HeapArena& heap_fixture(int64_t live) {
  if (g_heap.live == live && g_heap.arena) return *g_heap.arena;
  g_heap.arena.reset();
  g_heap.live = -1;
  const uint64_t holes = static_cast<uint64_t>(live) / 4;
  const uint64_t total = static_cast<uint64_t>(live) + holes;
  // Background blocks are at most 64 + 256 bytes; room for the largest
  // measured block (64 MiB) twice over besides.
  auto arena = std::make_unique<HeapArena>(total * 320 + 160 * MiB, false);
  Allocator a = arena->alloc();
  std::mt19937_64 rng(12345 + static_cast<uint64_t>(live));
  std::vector<BlockRef> refs;
  refs.reserve(total);
  for (uint64_t i = 0; i < total; ++i) {
    BlockRef r = a.allocate(Allocator::block_size_for(background_size(rng)),
                            UsedInit{g_heap.next_gen++, 0, 0});
    if (r.nil()) throw std::runtime_error("heap arena too small for the background blocks");
    refs.push_back(r);
  }
  std::shuffle(refs.begin(), refs.end(), rng);
  for (uint64_t i = 0; i < holes; ++i) a.free(refs[i]);
  g_heap.arena = std::move(arena);
  g_heap.live = live;
  return *g_heap.arena;
}

// The same background on a real pool, kept until <live> changes or the
// program ends.
struct PoolFixture {
  int64_t live = -1;
  std::unique_ptr<Pool> pool;
};
PoolFixture g_pool;

void drop_pool_fixture() {
  if (g_pool.pool && !g_pool.pool->left()) g_pool.pool->leave();
  g_pool.pool.reset();
  g_pool.live = -1;
}

Pool& pool_fixture(int64_t live) {
  if (g_pool.live == live && g_pool.pool) return *g_pool.pool;
  drop_pool_fixture();
  g_heap.arena.reset();  // the heap benchmarks are over: give that memory back
  g_heap.live = -1;
  const uint64_t holes = static_cast<uint64_t>(live) / 4;
  const uint64_t total = static_cast<uint64_t>(live) + holes;
  const PoolConfig cfg{4 * GiB, 256 * MiB, 60'000'000'000ull};
  g_pool.pool = Pool::attach(new_token(), cfg);
  Pool& p = *g_pool.pool;
  std::mt19937_64 rng(54321 + static_cast<uint64_t>(live));
  std::vector<Block> blocks;
  blocks.reserve(total);
  for (uint64_t i = 0; i < total; ++i) {
    auto b = p.allocate(background_size(rng), false, Mode::kSlow);
    if (!b) throw std::runtime_error("pool refused a background block");
    blocks.push_back(*b);
  }
  std::shuffle(blocks.begin(), blocks.end(), rng);
  for (uint64_t i = 0; i < holes; ++i)
    if (!p.release(blocks[i].ref, blocks[i].generation, Mode::kSlow))
      throw std::runtime_error("release failed");
  g_pool.live = live;
  return p;
}

// Gives back the memory of the background fixtures (benchmarks that use
// neither call this first).
void drop_fixtures() {
  drop_pool_fixture();
  g_heap.arena.reset();
  g_heap.live = -1;
}

// ========================================================== 1. alloc + free

const int64_t kSizes[] = {64, 1 << 10, 64 << 10, 1 << 20, 64 << 20};
const int64_t kLives[] = {1, 1000, 100000, 1000000};

// Args in <live>-major order, so that each background is built once.
void alloc_free_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"size", "live"});
  for (int64_t live : kLives)
    for (int64_t size : kSizes) {
      // Background + the block itself, in bytes: skip what would exceed ~4 GiB.
      const double bytes = 1.25 * static_cast<double>(live) * 320.0 + 2.0 * size + 160.0 * MiB;
      if (bytes > 4.0 * GiB) continue;
      b->Args({size, live});
    }
}

void BM_AllocFree(benchmark::State& state) {
  guarded(state, [&] {
    const uint64_t block = Allocator::block_size_for(static_cast<uint64_t>(state.range(0)));
    HeapArena& arena = heap_fixture(state.range(1));
    Allocator a = arena.alloc();
    for (auto _ : state) {
      BlockRef r = a.allocate(block, UsedInit{g_heap.next_gen++, 0, 0});
      benchmark::DoNotOptimize(r);
      if (r.nil()) {
        state.SkipWithError("allocate failed");
        break;
      }
      a.free(r);
    }
    state.SetItemsProcessed(state.iterations());
  });
}
BENCHMARK(BM_AllocFree)
    ->Apply(alloc_free_args)
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.1);

void BM_PoolAllocFree(benchmark::State& state) {
  guarded(state, [&] {
    const uint64_t size = static_cast<uint64_t>(state.range(0));
    Pool& p = pool_fixture(state.range(1));
    // Once in kSlow: grows the pool if no free block is that large yet.
    auto w = p.allocate(size, false, Mode::kSlow);
    if (!w || !p.release(w->ref, w->generation, Mode::kSlow))
      throw std::runtime_error("warm-up allocate/release failed");
    for (auto _ : state) {
      auto b = p.allocate(size, false, Mode::kFast);
      if (!b) {
        state.SkipWithError("kFast allocate declined in a single-process pool");
        break;
      }
      if (!p.release(b->ref, b->generation, Mode::kFast)) {
        state.SkipWithError("kFast release declined in a single-process pool");
        break;
      }
    }
    state.SetItemsProcessed(state.iterations());
  });
}
BENCHMARK(BM_PoolAllocFree)
    ->Apply(alloc_free_args)
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.1);

// ================================================================== 2-4. lock

void BM_LockUncontended(benchmark::State& state, bool use_lock) {
  guarded(state, drop_fixtures);
  LockWord w{0};
  AlwaysAlive probe;
  for (auto _ : state) {
    if (use_lock) {
      futex_lock::lock(w, 1, probe);
    } else if (!futex_lock::try_lock(w, 1)) {
      state.SkipWithError("try_lock failed on a free word");
      break;
    }
    futex_lock::unlock(w);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK_CAPTURE(BM_LockUncontended, try_lock, false)
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.1);
BENCHMARK_CAPTURE(BM_LockUncontended, lock, true)
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.1);

// The critical section of the contended benchmarks: a read-modify-write of
// data the lock protects, as the pool's are.
inline void critical_section(uint64_t& counter) {
  uint64_t v = counter;
  benchmark::DoNotOptimize(v);
  counter = v + 1;
}

alignas(64) LockWord g_thread_lock{0};
alignas(64) uint64_t g_thread_counter = 0;

void BM_LockContendedThreads(benchmark::State& state) {
  if (state.thread_index() == 0) guarded(state, drop_fixtures);
  AlwaysAlive probe;
  const uint32_t me = static_cast<uint32_t>(state.thread_index()) + 1;
  const Usage u0 = thread_usage(0);
  for (auto _ : state) {
    futex_lock::lock(g_thread_lock, me, probe);
    critical_section(g_thread_counter);
    futex_lock::unlock(g_thread_lock);
  }
  const Usage u = thread_usage(static_cast<uint64_t>(state.iterations())) - u0;
  state.SetItemsProcessed(state.iterations());
  // Summed over the threads, as for the processes (see usage_counters).
  state.counters["cpus_used"] =
      benchmark::Counter(static_cast<double>(u.cpu_ns) * 1e-9, benchmark::Counter::kIsRate);
  state.counters["sleeps"] = static_cast<double>(u.vol_cs);
  state.counters["preemptions_per_second"] =
      benchmark::Counter(static_cast<double>(u.invol_cs), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_LockContendedThreads)
    ->Threads(2)
    ->UseRealTime()
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.1);

void BM_LockContendedProcesses(benchmark::State& state) {
  guarded(state, [&] {
    drop_fixtures();
    SharedObj<ChildControl> ctl;
    ChildControl* c = &*ctl;
    pid_t pid = spawn([c] {
      AlwaysAlive probe;
      child_loop(c, [&] {
        futex_lock::lock(c->lock, 2, probe);
        critical_section(c->counter);
        futex_lock::unlock(c->lock);
      });
      return 0;
    });
    ChildGuard child(*c, pid);
    if (!child.wait_ready() || !child.to_phase(1)) throw std::runtime_error("child died");
    AlwaysAlive probe;
    const Usage u0 = thread_usage(0);
    for (auto _ : state) {
      futex_lock::lock(c->lock, 1, probe);
      critical_section(c->counter);
      futex_lock::unlock(c->lock);
    }
    const Usage parent = thread_usage(static_cast<uint64_t>(state.iterations())) - u0;
    if (!child.to_phase(2)) throw std::runtime_error("child died");
    const Usage theirs = c->at[2] - c->at[1];
    if (child.finish() != 0) throw std::runtime_error("child failed");
    // items_per_second: the parent's lock + unlock pairs.
    state.SetItemsProcessed(state.iterations());
    usage_counters(state, parent, theirs);
  });
}
BENCHMARK(BM_LockContendedProcesses)
    ->UseRealTime()
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.2);

// ======================================================= 5. pool, 1 vs 2 procs

constexpr uint64_t kPairBytes = 1024;
const PoolConfig kPairConfig{256 * MiB, 16 * MiB, 60'000'000'000ull};

// One allocate + release pair as the binding does it: kFast, then kSlow if
// kFast declined (the lock was busy). `unshared`: the block never left the
// process (no handle, no fork), so the binding releases it with
// release_unshared and it may come back from the local cache; otherwise
// every operation goes through the pool lock. Returns the kSlow retries.
int alloc_free_pair(Pool& p, bool unshared) {
  int slow = 0;
  auto b = p.allocate(kPairBytes, false, Mode::kFast);
  if (!b) {
    ++slow;
    b = p.allocate(kPairBytes, false, Mode::kSlow);
    if (!b) throw std::runtime_error("kSlow allocate failed");
  }
  bool done = unshared ? p.release_unshared(*b, Mode::kFast)
                       : p.release(b->ref, b->generation, Mode::kFast);
  if (!done) {
    ++slow;
    if (!p.release(b->ref, b->generation, Mode::kSlow))
      throw std::runtime_error("kSlow release failed");
  }
  return slow;
}

void pool_pairs(benchmark::State& state, bool two_processes, bool unshared) {
  guarded(state, [&] {
    drop_fixtures();
    const std::string tok = new_token();
    SharedObj<ChildControl> ctl;
    ChildControl* c = &*ctl;
    std::unique_ptr<Pool> p = Pool::attach(tok, kPairConfig);
    struct Leave {
      Pool& p;
      ~Leave() {
        try {
          p.leave();
        } catch (...) {
        }
      }
    } leave{*p};
    alloc_free_pair(*p, unshared);  // first use: grows and maps a segment (kSlow)
    std::optional<ChildGuard> child;
    if (two_processes) {
      pid_t pid = spawn([c, &tok, unshared] {
        // Its own attachment, after the fork: the parent's Pool object is
        // not used here.
        std::unique_ptr<Pool> cp = Pool::attach(tok, kPairConfig);
        alloc_free_pair(*cp, unshared);  // maps the segment
        child_loop(c, [&] { alloc_free_pair(*cp, unshared); });
        cp->leave();
        return 0;
      });
      child.emplace(*c, pid);
      if (!child->wait_ready() || !child->to_phase(1)) throw std::runtime_error("child died");
    }
    uint64_t slow = 0;
    const Usage u0 = thread_usage(0);
    for (auto _ : state) slow += static_cast<uint64_t>(alloc_free_pair(*p, unshared));
    const Usage parent = thread_usage(static_cast<uint64_t>(state.iterations())) - u0;
    Usage theirs;
    if (child) {
      if (!child->to_phase(2)) throw std::runtime_error("child died");
      theirs = c->at[2] - c->at[1];
      if (child->finish() != 0) throw std::runtime_error("child failed");
    }
    // items_per_second: the combined throughput, the parent's pairs and the
    // child's in the same (real) time.
    state.SetItemsProcessed(state.iterations() + static_cast<int64_t>(theirs.ops));
    usage_counters(state, parent, theirs);
    state.counters["parent_slow_retries_per_pair"] =
        static_cast<double>(slow) / static_cast<double>(std::max<int64_t>(state.iterations(), 1));
  });
}

// Arrays that stay in their process (the local cache applies).
void BM_PoolAllocFreeOneProcess(benchmark::State& state) { pool_pairs(state, false, true); }
void BM_PoolAllocFreeTwoProcesses(benchmark::State& state) { pool_pairs(state, true, true); }
// Arrays that were shared: every allocation and release takes the pool lock.
void BM_PoolAllocFreeSharedOneProcess(benchmark::State& state) { pool_pairs(state, false, false); }
void BM_PoolAllocFreeSharedTwoProcesses(benchmark::State& state) { pool_pairs(state, true, false); }
BENCHMARK(BM_PoolAllocFreeSharedOneProcess)
    ->UseRealTime()
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.3);
BENCHMARK(BM_PoolAllocFreeSharedTwoProcesses)
    ->UseRealTime()
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.3);
BENCHMARK(BM_PoolAllocFreeOneProcess)
    ->UseRealTime()
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.3);
BENCHMARK(BM_PoolAllocFreeTwoProcesses)
    ->UseRealTime()
    ->Repetitions(kReps)
    ->ReportAggregatesOnly(true)
    ->MinTime(0.3);

// ========================================================== 6. mixed random

// 70% allocation requests of log-uniform payload sizes in [64 B, 1 MiB], 30%
// frees of a random live block. Live blocks are capped at kMixedLive: at the
// cap an allocation request frees a random block first, so the pool stays
// in a steady state around kMixedLive live blocks (long-run allocations =
// frees). The state persists across runs; items are allocator calls.
constexpr uint64_t kMixedLive = 10000;
constexpr uint32_t kMixedTable = 1u << 16;  // precomputed random draws
constexpr uint64_t kMixedArena = 1536 * MiB;

struct MixedFixture {
  std::unique_ptr<HeapArena> arena;
  std::vector<BlockRef> live;
  std::vector<uint64_t> sizes;  // block sizes
  std::vector<uint32_t> pick;   // uniform 32-bit draws
  uint64_t step = 0;
  uint64_t next_gen = 1;
  uint64_t failures = 0;
};
std::unique_ptr<MixedFixture> g_mixed;

// Does one step of the workload; returns the number of allocator calls.
inline int mixed_step(MixedFixture& m, Allocator& a) {
  const uint32_t i = static_cast<uint32_t>(m.step++) & (kMixedTable - 1);
  const uint32_t r = m.pick[i];
  const uint32_t r2 = m.pick[(i + 7919) & (kMixedTable - 1)];
  auto free_random = [&](uint32_t draw) {
    const size_t k = static_cast<size_t>((uint64_t{draw} * m.live.size()) >> 32);
    a.free(m.live[k]);
    m.live[k] = m.live.back();
    m.live.pop_back();
  };
  int calls = 0;
  const bool want_alloc = r < static_cast<uint32_t>(0.7 * 4294967296.0);
  if (want_alloc || m.live.empty()) {
    if (m.live.size() >= kMixedLive) {
      free_random(r2);
      ++calls;
    }
    BlockRef ref = a.allocate(m.sizes[i], UsedInit{m.next_gen++, 0, 0});
    ++calls;
    if (ref.nil()) {
      ++m.failures;  // fragmentation: make room and go on
      if (!m.live.empty()) {
        free_random(r2);
        ++calls;
      }
    } else {
      m.live.push_back(ref);
    }
  } else {
    free_random(r2);
    ++calls;
  }
  return calls;
}

MixedFixture& mixed_fixture() {
  if (g_mixed) return *g_mixed;
  auto m = std::make_unique<MixedFixture>();
  // Mean block ~108 KiB: 1e4 live blocks are ~1.05 GiB; with room for
  // fragmentation (the chain's high-water mark settles near 1.2 GiB).
  // Prefaulted: as the blocks move, headers land on ever new pages, and
  // first-touch faults would otherwise dominate the time.
  m->arena = std::make_unique<HeapArena>(kMixedArena, true);
  std::mt19937_64 rng(777);
  std::uniform_real_distribution<double> d(std::log(64.0), std::log(static_cast<double>(MiB)));
  m->sizes.resize(kMixedTable);
  m->pick.resize(kMixedTable);
  for (uint32_t i = 0; i < kMixedTable; ++i) {
    m->sizes[i] = Allocator::block_size_for(static_cast<uint64_t>(std::exp(d(rng))));
    m->pick[i] = static_cast<uint32_t>(rng());
  }
  m->live.reserve(kMixedLive + 1);
  Allocator a = m->arena->alloc();
  // Fill to the cap, then run into the steady state.
  while (m->live.size() < kMixedLive) {
    BlockRef ref =
        a.allocate(m->sizes[m->step++ & (kMixedTable - 1)], UsedInit{m->next_gen++, 0, 0});
    if (ref.nil()) throw std::runtime_error("mixed arena too small");
    m->live.push_back(ref);
  }
  for (int i = 0; i < 300000; ++i) mixed_step(*m, a);
  m->failures = 0;
  g_mixed = std::move(m);
  return *g_mixed;
}

void BM_MixedRandom(benchmark::State& state) {
  guarded(state, [&] {
    drop_fixtures();
    MixedFixture& m = mixed_fixture();
    Allocator a = m.arena->alloc();
    int64_t calls = 0;
    const uint64_t failures0 = m.failures;
    for (auto _ : state) calls += mixed_step(m, a);
    state.SetItemsProcessed(calls);
    state.counters["calls_per_step"] =
        static_cast<double>(calls) / static_cast<double>(std::max<int64_t>(state.iterations(), 1));
    state.counters["live_blocks"] = static_cast<double>(m.live.size());
    state.counters["failed_allocs"] = static_cast<double>(m.failures - failures0);
  });
}
BENCHMARK(BM_MixedRandom)->Repetitions(kReps)->ReportAggregatesOnly(true)->MinTime(0.2);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  int rc = 0;
  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "core_bench: %s\n", e.what());
    rc = 1;
  }
  try {
    drop_pool_fixture();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "core_bench: leaving the pool failed: %s\n", e.what());
    rc = 1;
  }
  for (const std::string& tok : g_tokens)
    for (const std::string& name : list_segments(std::string(kShmPrefix) + tok)) {
      std::fprintf(stderr, "core_bench: ERROR: left /dev/shm/%s behind\n", name.c_str());
      rc = 1;
    }
  benchmark::Shutdown();
  return rc;
}
