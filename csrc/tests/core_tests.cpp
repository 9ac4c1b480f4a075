// Standalone tests of the pyarraypool core (csrc/core), without Python.
//
// `make core-tests` builds and runs this file; `make asan` runs it under
// AddressSanitizer and UBSan. There is no framework: TEST() registers a
// function, the tests run in file order, CHECK() records a failure with its
// file:line and carries on, REQUIRE() records one and abandons the test.
// Forked children never CHECK (their memory is not the parent's): they
// report through their exit status and print only when something fails.
// Every pool is made with a fresh random token, and the last test fails if
// an entry of /dev/shm of any of those tokens remains.

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/allocator.hpp"
#include "core/block_header.hpp"
#include "core/errors.hpp"
#include "core/futex_lock.hpp"
#include "core/handle.hpp"
#include "core/pool.hpp"
#include "core/pool_events.hpp"
#include "core/pool_snapshot.hpp"
#include "core/process_table.hpp"
#include "core/shm_segment.hpp"

using namespace pap;

namespace {

// ===================================================================== harness

struct TestCase {
  const char* name;
  void (*fn)();
};

std::vector<TestCase>& registry() {
  static std::vector<TestCase> r;
  return r;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

#define TEST(name)                             \
  void name();                                 \
  const Register register_##name(#name, name); \
  void name()

int g_failures = 0;                 // failures recorded by the running test
const char* g_test = "";            // its name, for the watchdog
std::vector<std::string> g_tokens;  // every pool token this program made

struct Abandon {};  // thrown by REQUIRE

void record_failure(const char* file, int line, const std::string& what) {
  ++g_failures;
  if (g_failures <= 12)
    std::printf("  FAIL %s:%d: %s\n", file, line, what.c_str());
  else if (g_failures == 13)
    std::printf("  (further failures of this test are not shown)\n");
}

template <class T>
std::string show(const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_enum_v<T>) {
    return std::to_string(static_cast<long long>(v));
  } else if constexpr (std::is_arithmetic_v<T>) {
    return std::to_string(v);
  } else {
    std::ostringstream os;
    os << v;
    return os.str();
  }
}

#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) record_failure(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                               \
  do {                                                                               \
    const auto& va_ = (a);                                                           \
    const auto& vb_ = (b);                                                           \
    if (!(va_ == vb_))                                                               \
      record_failure(__FILE__, __LINE__,                                             \
                     "CHECK_EQ(" #a ", " #b "): " + show(va_) + " != " + show(vb_)); \
  } while (0)

#define REQUIRE(cond)                                           \
  do {                                                          \
    if (!(cond)) {                                              \
      record_failure(__FILE__, __LINE__, "REQUIRE(" #cond ")"); \
      throw Abandon{};                                          \
    }                                                           \
  } while (0)

const char* kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::kPool:
      return "kPool";
    case ErrorKind::kPoolFull:
      return "kPoolFull";
    case ErrorKind::kStaleHandle:
      return "kStaleHandle";
    case ErrorKind::kInvalidHandle:
      return "kInvalidHandle";
    case ErrorKind::kOs:
      return "kOs";
  }
  return "?";
}

void check_throws(const std::function<void()>& fn, ErrorKind want, const char* file, int line,
                  const char* text) {
  try {
    fn();
  } catch (const CoreError& e) {
    if (e.kind() != want)
      record_failure(file, line,
                     std::string(text) + " threw " + kind_name(e.kind()) + " (" + e.what() +
                         "), expected " + kind_name(want));
    return;
  } catch (const std::exception& e) {
    record_failure(file, line, std::string(text) + " threw a non-core exception: " + e.what());
    return;
  }
  record_failure(file, line, std::string(text) + " did not throw " + kind_name(want));
}

void check_nothrow(const std::function<void()>& fn, const char* file, int line, const char* text) {
  try {
    fn();
  } catch (const std::exception& e) {
    record_failure(file, line, std::string(text) + " threw: " + e.what());
  }
}

#define CHECK_THROWS(kind, ...) \
  check_throws([&] { (void)(__VA_ARGS__); }, kind, __FILE__, __LINE__, #__VA_ARGS__)
#define CHECK_NOTHROW(...) \
  check_nothrow([&] { (void)(__VA_ARGS__); }, __FILE__, __LINE__, #__VA_ARGS__)

// In a forked child: report and return a failure exit status.
#define CHILD_CHECK(cond)                                                                       \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      std::fprintf(stderr, "  child %d: %s:%d: CHECK(%s) failed\n", static_cast<int>(getpid()), \
                   __FILE__, __LINE__, #cond);                                                  \
      return 1;                                                                                 \
    }                                                                                           \
  } while (0)

extern "C" void on_alarm(int) {
  // Only async-signal-safe calls: a hung test ends the program with a reason.
  const char a[] = "core_tests: timeout in test ";
  ssize_t ignored = ::write(1, a, sizeof a - 1);
  ignored = ::write(1, g_test, std::strlen(g_test));
  ignored = ::write(1, "\n", 1);
  (void)ignored;
  ::_exit(3);
}

// A pause the compiler cannot remove.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  asm volatile("" ::: "memory");
#endif
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// --------------------------------------------------------------- processes

// Runs `body` in a forked child, which _exit()s with its return value (no
// destructors, no atexit, no leave()).
pid_t spawn(const std::function<int()>& body) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::alarm(60);  // never outlive a hung parent for long
    int rc = 97;
    try {
      rc = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  child %d: exception: %s\n", static_cast<int>(getpid()), e.what());
      rc = 98;
    } catch (...) {
      rc = 99;
    }
    ::_exit(rc);
  }
  return pid;
}

// The child's exit status, or 128 + the signal that killed it.
int wait_child(pid_t pid) {
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0)
    if (errno != EINTR) return -1;
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return -1;
}

struct Pipe {
  int r = -1, w = -1;
  Pipe() {
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("pipe failed");
    r = fds[0];
    w = fds[1];
  }
  ~Pipe() {
    close_r();
    close_w();
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  void close_r() {
    if (r >= 0) ::close(r);
    r = -1;
  }
  void close_w() {
    if (w >= 0) ::close(w);
    w = -1;
  }
};

bool write_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::write(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool read_all(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = ::read(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool write_string(int fd, const std::string& s) {
  uint32_t n = static_cast<uint32_t>(s.size());
  return write_all(fd, &n, sizeof n) && write_all(fd, s.data(), s.size());
}

std::optional<std::string> read_string(int fd) {
  uint32_t n;
  if (!read_all(fd, &n, sizeof n) || n > (1u << 20)) return std::nullopt;
  std::string s(n, '\0');
  if (!read_all(fd, s.data(), n)) return std::nullopt;
  return s;
}

// ------------------------------------------------------------------- data

uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// A size in [0, max] drawn log-uniformly (every order of magnitude equally).
uint64_t log_uniform(std::mt19937_64& rng, uint64_t max) {
  std::uniform_real_distribution<double> d(0.0, std::log(static_cast<double>(max) + 1.0));
  uint64_t v = static_cast<uint64_t>(std::exp(d(rng))) - 1;
  return std::min(v, max);
}

// Fills `n` bytes with the 8-byte `word` repeated; checked with two memcmp
// calls (first word, then "periodic with period 8"), fast enough to cover
// every byte of every block.
void fill_pattern(unsigned char* p, uint64_t n, uint64_t word) {
  if (n < 8) {
    std::memcpy(p, &word, n);
    return;
  }
  std::memcpy(p, &word, 8);
  for (uint64_t done = 8; done < n;) {
    uint64_t k = std::min(done, n - done);
    std::memcpy(p + done, p, k);
    done += k;
  }
}

bool check_pattern(const unsigned char* p, uint64_t n, uint64_t word) {
  if (n < 8) return std::memcmp(p, &word, n) == 0;
  return std::memcmp(p, &word, 8) == 0 && std::memcmp(p, p + 8, n - 8) == 0;
}

// ================================================================ allocator

// Segments and an AllocState in one region (heap, or a MAP_SHARED mapping
// for tests that kill a process mid-operation), laid out as a pool lays
// them out in shared memory, with canary bytes after every segment to catch
// a write past its end.
class Arena {
 public:
  static constexpr unsigned char kCanary = 0xA5;

  explicit Arena(const std::vector<uint64_t>& sizes, bool shared = false, size_t extra = 0)
      : sizes_(sizes), shared_(shared) {
    uint64_t at = round_up(sizeof(AllocState), 64);
    std::vector<uint64_t> offsets;
    for (uint64_t s : sizes) {
      offsets.push_back(at);
      at += round_up(s, 64) + 64;  // at least 64 canary bytes
    }
    extra_at_ = at;
    bytes_ = round_up(at + extra, 4096);
    if (shared) {
      void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
      region_ = static_cast<unsigned char*>(p);
    } else {
      region_ = static_cast<unsigned char*>(std::aligned_alloc(64, bytes_));
      if (!region_) throw std::bad_alloc();
    }
    state_ = reinterpret_cast<AllocState*>(region_);
    for (size_t i = 0; i < sizes.size(); ++i) {
      spans_.push_back(SegmentSpan{region_ + offsets[i], sizes[i]});
      std::memset(region_ + offsets[i] + sizes[i], kCanary, round_up(sizes[i], 64) + 64 - sizes[i]);
    }
    format();
  }
  ~Arena() {
    if (shared_)
      ::munmap(region_, bytes_);
    else
      std::free(region_);
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // A byte-for-byte copy at another address: same refs, same blocks.
  std::unique_ptr<Arena> clone() const {
    auto c = std::make_unique<Arena>(sizes_, false, bytes_ - extra_at_);
    std::memcpy(c->region_, region_, bytes_);
    return c;
  }

  void format() {
    Allocator a = alloc();
    a.reset();
    for (uint32_t i = 0; i < nsegs(); ++i) {
      a.format_segment(i);
      a.add_segment(i);
    }
  }

  Allocator alloc() { return Allocator(*state_, spans_.data()); }
  AllocState& state() { return *state_; }
  uint32_t nsegs() const { return static_cast<uint32_t>(spans_.size()); }
  const SegmentSpan& span(uint32_t i) const { return spans_[i]; }
  uint64_t usable(uint32_t i) const { return spans_[i].size & kSizeMask; }
  void* extra() { return region_ + extra_at_; }

  bool canaries_ok() const {
    for (size_t i = 0; i < spans_.size(); ++i) {
      const unsigned char* p = spans_[i].base + sizes_[i];
      for (uint64_t k = 0; k < round_up(sizes_[i], 64) + 64 - sizes_[i]; ++k)
        if (p[k] != kCanary) return false;
    }
    return true;
  }

 private:
  std::vector<uint64_t> sizes_;
  bool shared_;
  unsigned char* region_ = nullptr;
  size_t bytes_ = 0;
  uint64_t extra_at_ = 0;
  AllocState* state_ = nullptr;
  std::vector<SegmentSpan> spans_;
};

struct ChainBlock {
  uint64_t ref_bits;
  uint64_t size;
  bool used;
  uint64_t generation;  // 0 for free blocks
  bool operator==(const ChainBlock& o) const {
    return ref_bits == o.ref_bits && size == o.size && used == o.used && generation == o.generation;
  }
};

std::vector<ChainBlock> chain_of(Arena& ar) {
  std::vector<ChainBlock> out;
  Allocator a = ar.alloc();
  for (uint32_t seg = 0; seg < ar.nsegs(); ++seg)
    a.for_each_block(seg, [&](BlockRef r, const BlockHeader& h) {
      out.push_back({r.bits(), h.size(), h.used(), h.used() ? h.generation : 0});
    });
  return out;
}

// Every (ref, size) on the free lists.
std::set<std::pair<uint64_t, uint64_t>> free_lists_of(Arena& ar) {
  std::set<std::pair<uint64_t, uint64_t>> out;
  Allocator a = ar.alloc();
  for (uint32_t fl = 0; fl < kFlCount; ++fl)
    for (uint32_t sl = 0; sl < kSlCount; ++sl)
      for (uint64_t b = ar.state().heads[fl][sl]; b != BlockRef::kNilBits;) {
        BlockHeader* h = a.header(BlockRef::from_bits(b));
        out.insert({b, h->size()});
        b = h->free_links.next;
        if (out.size() > 10'000'000) return out;  // a cycle: verify reports it
      }
  return out;
}

std::string verify_error(Arena& ar) {
  try {
    ar.alloc().verify(ar.nsegs());
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

#define CHECK_VERIFY(arena)                                                          \
  do {                                                                               \
    std::string e_ = verify_error(arena);                                            \
    if (!e_.empty()) record_failure(__FILE__, __LINE__, "Allocator::verify: " + e_); \
  } while (0)

// True when segment `seg` is one free block covering all of it.
bool segment_is_empty(Arena& ar, uint32_t seg) {
  int n = 0;
  bool ok = true;
  ar.alloc().for_each_block(seg, [&](BlockRef r, const BlockHeader& h) {
    ++n;
    ok &= r.off() == 0 && !h.used() && h.size() == ar.usable(seg);
  });
  return n == 1 && ok;
}

// 1. Random allocate/free against a model of the live blocks.
TEST(allocator_random_ops_against_model) {
  // Odd sizes on purpose, one not a multiple of 64 (its last 8 bytes are
  // not part of any block, and nothing may be written there).
  Arena ar({4u << 20, (8u << 20) + 7 * 64 + 8, (16u << 20) - 4096, (3u << 20) + 320});
  CHECK_VERIFY(ar);
  Allocator a = ar.alloc();
  std::mt19937_64 rng(1);

  struct Live {
    BlockRef ref;
    uint64_t generation, requested, word;
  };
  std::vector<Live> live;
  std::map<uintptr_t, uintptr_t> ranges;  // block start address -> end address
  uint64_t generation = 0, nils = 0, allocs = 0, frees = 0;
  bool model_ok = true;

  for (int op = 0; op < 200000 && model_ok; ++op) {
    bool do_alloc = live.empty() || (rng() & 1);
    if (do_alloc) {
      uint64_t want = log_uniform(rng, 1u << 20);
      uint64_t bs = Allocator::block_size_for(want);
      ++generation;
      BlockRef r = a.allocate(bs, UsedInit{generation, 3, 0});
      if (r.nil()) {
        ++nils;
        bool fits = false;
        for (const ChainBlock& b : chain_of(ar)) fits |= !b.used && b.size >= bs;
        CHECK(!fits);  // nil only when no free block is large enough
        do_alloc = false;
      } else {
        ++allocs;
        BlockHeader* h = a.header(r);
        unsigned char* payload = h->payload();
        CHECK(r.seg() < ar.nsegs() && r.off() + h->size() <= ar.usable(r.seg()));
        CHECK(reinterpret_cast<uintptr_t>(payload) % 64 == 0);
        CHECK(h->capacity() >= want);
        CHECK_EQ(h->size(), bs);  // split to the exact block size
        CHECK(h->used());
        CHECK_EQ(h->generation, generation);
        CHECK_EQ(h->check, header_check(r.off(), generation));
        CHECK(h->holders.test(3) && h->holders.count() == 1);
        CHECK(h->pending == 0 && h->flags == 0);
        uintptr_t begin = reinterpret_cast<uintptr_t>(h), end = begin + h->size();
        auto next = ranges.lower_bound(begin);
        bool overlap = (next != ranges.end() && next->first < end) ||
                       (next != ranges.begin() && std::prev(next)->second > begin);
        CHECK(!overlap);
        if (overlap) model_ok = false;
        ranges[begin] = end;
        uint64_t word = splitmix(r.bits() ^ (generation << 20));
        fill_pattern(payload, h->capacity(), word);
        live.push_back({r, generation, want, word});
      }
    }
    if (!do_alloc && !live.empty()) {
      size_t k = rng() % live.size();
      Live b = live[k];
      BlockHeader* h = a.header(b.ref);
      CHECK(h->used() && h->generation == b.generation);
      if (!check_pattern(h->payload(), h->capacity(), b.word)) {
        record_failure(__FILE__, __LINE__, "block content changed while it was live");
        model_ok = false;
      }
      ranges.erase(reinterpret_cast<uintptr_t>(h));
      a.free(b.ref);
      ++frees;
      live[k] = live.back();
      live.pop_back();
    }
    if (op % 1000 == 999) {
      std::string e = verify_error(ar);
      if (!e.empty()) {
        record_failure(__FILE__, __LINE__, "verify after op " + std::to_string(op) + ": " + e);
        model_ok = false;
      }
      if (!ar.canaries_ok()) {
        record_failure(__FILE__, __LINE__, "a write past the end of a segment");
        model_ok = false;
      }
      uint64_t largest = 0;
      for (const ChainBlock& b : chain_of(ar))
        if (!b.used) largest = std::max(largest, b.size);
      CHECK_EQ(a.largest_free(), largest);
    }
  }
  CHECK(nils > 0);  // the arena did fill up, so the nil path was exercised
  CHECK(allocs > 50000 && frees > 50000);
  for (const Live& b : live) {
    BlockHeader* h = a.header(b.ref);
    CHECK(check_pattern(h->payload(), h->capacity(), b.word));
    a.free(b.ref);
  }
  CHECK_VERIFY(ar);
  for (uint32_t seg = 0; seg < ar.nsegs(); ++seg) CHECK(segment_is_empty(ar, seg));
  CHECK(ar.canaries_ok());
  CHECK_EQ(a.largest_free(), ar.usable(2));
}

// A free block of exactly the requested size must be found, and nil comes
// back only when no free block is large enough.
TEST(allocator_exact_fit_and_nil) {
  // 1 MiB + 64 is not the first size of its class: a pure good-fit search
  // (rounding the request up to the next class) would skip such a block.
  const uint64_t bs = Allocator::block_size_for(1u << 20);
  {
    Arena ar({bs});
    Allocator a = ar.alloc();
    BlockRef r = a.allocate(bs, UsedInit{1, 0, 0});
    CHECK(!r.nil());
    if (!r.nil()) {
      CHECK_EQ(a.header(r)->size(), bs);
      CHECK(a.allocate(64, UsedInit{2, 0, 0}).nil());  // full
      a.free(r);
    }
    CHECK(a.allocate(bs + 64, UsedInit{3, 0, 0}).nil());  // larger than the segment
    CHECK(segment_is_empty(ar, 0));
    CHECK_VERIFY(ar);
  }
  {
    // Three blocks fill the segment; freeing the middle one leaves one hole
    // of exactly bs, and the same request must land in it.
    Arena ar({3 * bs});
    Allocator a = ar.alloc();
    BlockRef b[3];
    for (int i = 0; i < 3; ++i) {
      b[i] = a.allocate(bs, UsedInit{uint64_t(10 + i), 0, 0});
      REQUIRE(!b[i].nil());
    }
    a.free(b[1]);
    CHECK(a.allocate(bs + 64, UsedInit{20, 0, 0}).nil());
    BlockRef again = a.allocate(bs, UsedInit{21, 0, 0});
    CHECK(again == b[1]);
    CHECK_VERIFY(ar);
  }
  {
    // Many small holes, none large enough: nil, and nothing changes.
    Arena ar({1u << 20});
    Allocator a = ar.alloc();
    std::vector<BlockRef> refs;
    for (uint64_t g = 1;; ++g) {
      BlockRef r = a.allocate(Allocator::block_size_for(1000), UsedInit{g, 0, 0});
      if (r.nil()) break;
      refs.push_back(r);
    }
    REQUIRE(refs.size() > 100);
    for (size_t i = 0; i < refs.size(); i += 2) a.free(refs[i]);
    auto before = chain_of(ar);
    CHECK(a.allocate(Allocator::block_size_for(3000), UsedInit{99999, 0, 0}).nil());
    CHECK(chain_of(ar) == before);
    CHECK(!a.allocate(Allocator::block_size_for(900), UsedInit{99999, 0, 0}).nil());
    CHECK_VERIFY(ar);
  }
  CHECK_EQ(Allocator::block_size_for(0), 64u);
  CHECK_EQ(Allocator::block_size_for(1), 128u);
  CHECK_EQ(Allocator::block_size_for(64), 128u);
  CHECK_EQ(Allocator::block_size_for(65), 192u);
  CHECK_EQ(Allocator::block_size_for(uint64_t{1} << 60), 0u);  // overflow
}

// 2. Size classes.
uint64_t class_start(uint32_t fl, uint32_t sl) {
  return fl == 0 ? sl : uint64_t{kSlCount + sl} << (fl - 1);
}

TEST(allocator_size_classes) {
  auto check_unit = [](uint64_t u) {
    uint32_t fl = 99, sl = 99;
    const bool fits = u <= (uint64_t{2 * kSlCount - 1} << (kFlCount - 2));  // last class start
    bool ok = Allocator::mapping_search(u, fl, sl);
    if (ok != fits) {
      record_failure(__FILE__, __LINE__,
                     "mapping_search(" + std::to_string(u) + ") returned " + show(ok));
      return;
    }
    if (ok) {
      if (fl >= kFlCount || sl >= kSlCount) {
        record_failure(__FILE__, __LINE__, "class out of range for " + std::to_string(u));
        return;
      }
      uint64_t start = class_start(fl, sl);
      // Every member of the class found is >= u, and the rounding wastes at
      // most 1/32.
      if (start < u || (u >= kSlCount && start - u > u / kSlCount) || (u < kSlCount && start != u))
        record_failure(__FILE__, __LINE__,
                       "mapping_search(" + std::to_string(u) + ") gave a class starting at " +
                           std::to_string(start));
    }
    if (u < (uint64_t{1} << 44)) {
      uint32_t ifl, isl;
      Allocator::mapping_insert(u, ifl, isl);
      uint64_t lo = class_start(ifl, isl);
      uint64_t hi = ifl == 0 ? lo + 1 : lo + (uint64_t{1} << (ifl - 1));
      if (!(lo <= u && u < hi) || ifl >= kFlCount)
        record_failure(__FILE__, __LINE__,
                       "mapping_insert(" + std::to_string(u) + ") gave class [" +
                           std::to_string(lo) + ", " + std::to_string(hi) + ")");
    }
  };
  for (uint64_t u = 1; u <= 1000000; ++u) check_unit(u);
  for (uint32_t k = 0; k <= 47; ++k) {
    uint64_t p = uint64_t{1} << k;
    check_unit(p);
    check_unit(p + 1);
    if (p > 1) check_unit(p - 1);
  }
  const uint64_t last = uint64_t{2 * kSlCount - 1} << (kFlCount - 2);
  check_unit(last);
  check_unit(last + 1);
  uint32_t fl, sl;
  CHECK(!Allocator::mapping_search(last + 1, fl, sl));
  // Requests that cannot be classed come back nil, not as a wrong block.
  Arena ar({1u << 20});
  CHECK(ar.alloc().allocate((last + 1) * kAlign, UsedInit{1, 0, 0}).nil());
  CHECK(ar.alloc().allocate(uint64_t{1} << 47, UsedInit{1, 0, 0}).nil());
  CHECK(segment_is_empty(ar, 0));
}

// Runs `n` random operations on `ar`, updating `live` (ref bits -> size).
void random_ops(Arena& ar, std::mt19937_64& rng, int n, uint64_t max_bytes,
                std::map<uint64_t, uint64_t>& live, uint64_t& generation) {
  Allocator a = ar.alloc();
  for (int i = 0; i < n; ++i) {
    if (live.empty() || rng() % 100 < 55) {
      uint64_t bs = Allocator::block_size_for(log_uniform(rng, max_bytes));
      BlockRef r = a.allocate(bs, UsedInit{++generation, 1, 0});
      if (!r.nil()) {
        live[r.bits()] = a.header(r)->size();
        continue;
      }
    }
    if (live.empty()) continue;
    auto it = live.begin();
    std::advance(it, rng() % std::min<size_t>(live.size(), 16));
    a.free(BlockRef::from_bits(it->first));
    live.erase(it);
  }
}

// 3a. The index is only an index: rebuilt from the chain alone it is whole.
TEST(allocator_rebuild_after_losing_the_index) {
  std::mt19937_64 rng(3);
  for (int round = 0; round < 8; ++round) {
    Arena ar({2u << 20, (2u << 20) + 5 * 64, 1u << 20});
    std::map<uint64_t, uint64_t> live;
    uint64_t generation = 0;
    random_ops(ar, rng, 100 + static_cast<int>(rng() % 20000), 128u << 10, live, generation);
    REQUIRE(verify_error(ar).empty());
    const auto chain_before = chain_of(ar);
    const auto lists_before = free_lists_of(ar);

    // The snapshot as a killed process would leave it, with everything that
    // is not the chain destroyed: the whole AllocState (zeros, or garbage),
    // every prev_size and every free block's links.
    std::unique_ptr<Arena> snap = ar.clone();
    if (round % 2 == 0) {
      std::memset(&snap->state(), 0, sizeof(AllocState));
    } else {
      auto* bytes = reinterpret_cast<unsigned char*>(&snap->state());
      for (size_t i = 0; i < sizeof(AllocState); ++i) bytes[i] = static_cast<unsigned char>(rng());
    }
    Allocator s = snap->alloc();
    for (const ChainBlock& b : chain_before) {
      BlockHeader* h = s.header(BlockRef::from_bits(b.ref_bits));
      h->prev_size = rng();
      if (!b.used) {
        h->free_links.next = rng();
        h->free_links.prev = rng();
      }
    }
    uint64_t kept = 0;
    Allocator::WalkTotals t = s.rebuild(snap->nsegs(), [&](BlockRef, BlockHeader&) {
      ++kept;
      return true;
    });
    CHECK_VERIFY(*snap);
    CHECK_EQ(kept, live.size());
    CHECK(chain_of(*snap) == chain_before);  // same used blocks: refs, sizes, generations
    CHECK(free_lists_of(*snap) == lists_before);
    uint64_t free_bytes = 0, free_blocks = 0, largest = 0;
    for (const ChainBlock& b : chain_before)
      if (!b.used) {
        free_bytes += b.size;
        ++free_blocks;
        largest = std::max(largest, b.size);
      }
    CHECK_EQ(t.free_bytes, free_bytes);
    CHECK_EQ(t.free_blocks, free_blocks);
    CHECK_EQ(t.largest_free, largest);

    // The rebuilt index works: keep going, then free everything.
    random_ops(*snap, rng, 3000, 128u << 10, live, generation);
    CHECK_VERIFY(*snap);
    for (const auto& [bits, size] : live) snap->alloc().free(BlockRef::from_bits(bits));
    CHECK_VERIFY(*snap);
    for (uint32_t seg = 0; seg < snap->nsegs(); ++seg) CHECK(segment_is_empty(*snap, seg));
    CHECK(snap->canaries_ok());
  }
}

// 3b. A process really killed at a random instruction of an allocate or a
// free: the chain it leaves rebuilds into an index that passes verify, with
// every block whose allocation had completed (and whose free had not
// started) still used at the same ref with the same size.
struct KillLog {
  static constexpr uint32_t kSlots = 256;
  std::atomic<uint32_t> op;    // 0 idle, 1 allocating into `slot`, 2 freeing `slot`
  std::atomic<uint32_t> slot;  // the slot of the operation in flight
  std::atomic<uint64_t> done_ops;
  std::atomic<uint64_t> next_generation;
  std::atomic<uint64_t> ref[kSlots];  // BlockRef bits, kNilBits when empty
  std::atomic<uint64_t> size[kSlots];
};

int allocator_kill_child(Arena& ar, KillLog& log, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Allocator a = ar.alloc();
  for (;;) {
    uint32_t s = static_cast<uint32_t>(rng() % KillLog::kSlots);
    uint64_t bits = log.ref[s].load();
    log.slot.store(s);
    if (bits == BlockRef::kNilBits) {
      uint64_t bs = Allocator::block_size_for(log_uniform(rng, 32u << 10));
      log.op.store(1);
      BlockRef r = a.allocate(bs, UsedInit{log.next_generation.fetch_add(1), 1, 0});
      if (!r.nil()) {
        log.size[s].store(a.header(r)->size());
        log.ref[s].store(r.bits());
      }
    } else {
      log.op.store(2);
      a.free(BlockRef::from_bits(bits));
      log.ref[s].store(BlockRef::kNilBits);
    }
    log.op.store(0);
    log.done_ops.fetch_add(1, std::memory_order_relaxed);
  }
}

TEST(allocator_rebuild_after_kill_mid_operation) {
  Arena ar({512u << 10, (512u << 10) + 3 * 64, 256u << 10}, /*shared=*/true, sizeof(KillLog));
  auto* log = new (ar.extra()) KillLog();
  for (auto& r : log->ref) r.store(BlockRef::kNilBits);
  log->next_generation.store(1);
  Allocator a = ar.alloc();
  std::mt19937_64 rng(4);
  int mid_op = 0;
  for (int iter = 0; iter < 150; ++iter) {
    const uint64_t start = log->done_ops.load();
    const uint64_t seed = rng();
    pid_t pid = spawn([&] { return allocator_kill_child(ar, *log, seed); });
    // Let it run a random number of operations, then kill it wherever it is.
    const uint64_t target = start + 1 + rng() % 3000;
    auto t0 = Clock::now();
    while (log->done_ops.load() < target && seconds_since(t0) < 2) {
    }
    for (uint64_t spin = rng() % 20000; spin > 0; --spin) cpu_relax();
    ::kill(pid, SIGKILL);
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);

    const uint32_t op = log->op.load(), slot = log->slot.load();
    mid_op += op != 0;
    std::map<uint64_t, uint64_t> used;
    try {
      a.rebuild(ar.nsegs(), [&](BlockRef r, BlockHeader& h) {
        used[r.bits()] = h.size();
        return true;
      });
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("rebuild: ") + e.what());
      return;
    }
    std::string err = verify_error(ar);
    if (!err.empty()) {
      record_failure(__FILE__, __LINE__,
                     "verify after a kill during op " + std::to_string(op) + " (iteration " +
                         std::to_string(iter) + "): " + err);
      return;
    }
    std::set<uint64_t> expected;
    for (uint32_t i = 0; i < KillLog::kSlots; ++i) {
      uint64_t bits = log->ref[i].load();
      if (bits == BlockRef::kNilBits || (op == 2 && i == slot)) continue;
      expected.insert(bits);
      auto it = used.find(bits);
      if (it == used.end() || it->second != log->size[i].load())
        record_failure(__FILE__, __LINE__, "a completed allocation was lost or resized");
    }
    std::vector<uint64_t> extra;
    for (const auto& [bits, size] : used)
      if (!expected.count(bits)) extra.push_back(bits);
    if (op == 2) {
      // The block being freed is either still used, whole, or gone.
      uint64_t bits = log->ref[slot].load();
      CHECK(extra.empty() ||
            (extra.size() == 1 && extra[0] == bits && used[bits] == log->size[slot].load()));
      if (extra.empty()) log->ref[slot].store(BlockRef::kNilBits);
    } else if (op == 1) {
      // The allocation in flight may or may not have committed.
      CHECK(extra.size() <= 1);
      if (extra.size() == 1 && log->ref[slot].load() == BlockRef::kNilBits) {
        log->size[slot].store(used[extra[0]]);
        log->ref[slot].store(extra[0]);  // adopt it: the next child frees it
      }
    } else {
      CHECK(extra.empty());
    }
    log->op.store(0);
    CHECK(ar.canaries_ok());
    if (g_failures) return;
  }
  CHECK(mid_op > 50);  // most kills did land inside an operation
  for (const ChainBlock& b : chain_of(ar))
    if (b.used) a.free(BlockRef::from_bits(b.ref_bits));
  CHECK_VERIFY(ar);
  for (uint32_t seg = 0; seg < ar.nsegs(); ++seg) CHECK(segment_is_empty(ar, seg));
}

// 4. rebuild() with a keep function that drops some used blocks.
TEST(allocator_rebuild_drops_blocks) {
  std::mt19937_64 rng(5);
  for (int round = 0; round < 20; ++round) {
    Arena ar({(1u << 20) + 64 * (rng() % 100), 256u << 10});
    Allocator a = ar.alloc();
    std::vector<BlockRef> refs;
    for (uint64_t g = 1;; ++g) {
      BlockRef r =
          a.allocate(Allocator::block_size_for(log_uniform(rng, 16u << 10)), UsedInit{g, 2, 0});
      if (r.nil()) break;
      refs.push_back(r);
    }
    // Some already free, so that dropped blocks meet free neighbours too.
    std::set<uint64_t> drop;
    for (BlockRef r : refs) {
      uint64_t x = rng() % 10;
      if (x < 2)
        a.free(r);
      else if (x < 6)
        drop.insert(r.bits());
    }
    const auto before = chain_of(ar);
    // Expected chain: kept blocks unchanged, every maximal run of free or
    // dropped blocks one free block.
    std::vector<ChainBlock> want;
    for (const ChainBlock& b : before) {
      bool stays = b.used && !drop.count(b.ref_bits);
      if (stays) {
        want.push_back(b);
      } else if (!want.empty() && !want.back().used &&
                 BlockRef::from_bits(want.back().ref_bits).seg() ==
                     BlockRef::from_bits(b.ref_bits).seg()) {
        want.back().size += b.size;
      } else {
        want.push_back({b.ref_bits, b.size, false, 0});
      }
    }
    uint64_t asked = 0, used_before = 0;
    for (const ChainBlock& b : before) used_before += b.used;
    Allocator::WalkTotals t = a.rebuild(ar.nsegs(), [&](BlockRef r, BlockHeader& h) {
      ++asked;
      if (drop.count(r.bits())) return false;
      h.pending = 7;  // the keep function may edit the header
      return true;
    });
    CHECK_EQ(asked, used_before);
    CHECK_VERIFY(ar);
    CHECK(chain_of(ar) == want);
    uint64_t free_bytes = 0, free_blocks = 0, largest = 0;
    for (const ChainBlock& b : want)
      if (!b.used) {
        free_bytes += b.size;
        ++free_blocks;
        largest = std::max(largest, b.size);
      }
    CHECK_EQ(t.free_bytes, free_bytes);
    CHECK_EQ(t.free_blocks, free_blocks);
    CHECK_EQ(t.largest_free, largest);
    for (const ChainBlock& b : want)
      if (b.used) CHECK_EQ(a.header(BlockRef::from_bits(b.ref_bits))->pending, 7u);
    // The coalesced space is allocatable as one block.
    if (largest >= 128) {
      BlockRef big = a.allocate(largest, UsedInit{1000000, 0, 0});
      CHECK(!big.nil());
      CHECK_VERIFY(ar);
    }
  }
}

// ==================================================================== handle

Handle random_handle(std::mt19937_64& rng) {
  Handle h;
  for (auto& b : h.pool.bytes) b = static_cast<uint8_t>(rng());
  h.ref = BlockRef(static_cast<uint32_t>(rng() % BlockRef::kMaxSegments),
                   (rng() % (uint64_t{1} << 42)) * kAlign);
  h.generation = std::max<uint64_t>(rng(), 1);
  h.flags = static_cast<uint8_t>(rng() % 2);
  h.ndim = static_cast<uint32_t>(rng() % (kMaxDims + 1));
  h.itemsize = 1 + rng() % 16;
  int64_t neg = 0;
  for (uint32_t i = 0; i < h.ndim; ++i) {
    // Valid means numpy could build it: the element count times the item
    // size fits in 63 bits (4^16 * 16 does), so only 16 dimensions vary.
    h.shape[i] = rng() % 25 == 0 ? 0 : 1 + static_cast<int64_t>(i < 16 ? rng() % 4 : 0);
    h.strides[i] = static_cast<int64_t>(rng() % 2001) - 1000;
    if (h.strides[i] < 0 && h.shape[i] > 0) neg += (h.shape[i] - 1) * h.strides[i];
  }
  h.view_offset = static_cast<uint64_t>(-neg) + rng() % 4096;
  return h;
}

bool same_handle(const Handle& a, const Handle& b) {
  if (!(a.pool == b.pool) || a.ref != b.ref || a.generation != b.generation || a.flags != b.flags ||
      a.view_offset != b.view_offset || a.itemsize != b.itemsize || a.ndim != b.ndim)
    return false;
  for (uint32_t i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i] || a.strides[i] != b.strides[i]) return false;
  return true;
}

void poke64(std::string& s, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) s[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

Handle decode(const std::string& s) { return decode_handle(s.data(), s.size()); }

// 5. Handle encoding.
TEST(handle_round_trip) {
  std::mt19937_64 rng(6);
  for (int i = 0; i < 20000; ++i) {
    Handle h = random_handle(rng);
    std::string bytes = encode_handle(h);
    CHECK_EQ(bytes.size(), kHandleFixedBytes + 16 * h.ndim);
    Handle d;
    try {
      d = decode(bytes);
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("a valid handle was refused: ") + e.what());
      continue;
    }
    CHECK(same_handle(h, d));
    CHECK(encode_handle(d) == bytes);
  }
  // Layout as documented in handle.hpp.
  Handle h;
  h.pool = PoolId::from_token("000102030405060708090a0b0c0d0e0f");
  h.ref = BlockRef(3, 128);
  h.generation = 0x1122334455667788ull;
  h.flags = kHandleFlagTransferRequired;
  h.view_offset = 8;
  h.itemsize = 4;
  h.ndim = 1;
  h.shape[0] = 2;
  h.strides[0] = -4;
  std::string b = encode_handle(h);
  REQUIRE(b.size() == 80);
  CHECK(b.compare(0, 4, "PAPH") == 0);
  CHECK(b[4] == 1 && b[5] == 1 && b[6] == 1 && b[7] == 0);
  for (int i = 0; i < 16; ++i) CHECK_EQ(static_cast<int>(b[8 + i]), i);
  CHECK_EQ(static_cast<unsigned char>(b[24]), 128u);
  CHECK_EQ(static_cast<unsigned char>(b[30]), 3u);  // segment in bits 48..63
  CHECK_EQ(static_cast<unsigned char>(b[32]), 0x88u);
  CHECK_EQ(static_cast<unsigned char>(b[39]), 0x11u);
  CHECK_EQ(static_cast<unsigned char>(b[72]), 0xFCu);  // stride -4, little-endian
}

TEST(handle_rejects_malformed) {
  Handle base;
  base.pool = PoolId::from_token(random_token());
  base.ref = BlockRef(1, 128);
  base.generation = 5;
  base.flags = kHandleFlagTransferRequired;
  base.itemsize = 8;
  base.ndim = 2;
  base.shape[0] = 3;
  base.shape[1] = 4;
  base.strides[0] = 32;
  base.strides[1] = 8;
  const std::string good = encode_handle(base);
  CHECK_NOTHROW(decode(good));
  auto with = [&](const std::function<void(std::string&)>& edit) {
    std::string s = good;
    edit(s);
    return s;
  };
  const ErrorKind bad = ErrorKind::kInvalidHandle;
  CHECK_THROWS(bad, decode(""));
  CHECK_THROWS(bad, decode(good.substr(0, 63)));
  CHECK_THROWS(bad, decode(good.substr(0, good.size() - 1)));
  CHECK_THROWS(bad, decode(good.substr(0, good.size() - 16)));
  CHECK_THROWS(bad, decode(good + '\0'));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[0] = 'X'; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[3] = 'h'; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[4] = 0; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[4] = 2; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[6] = 3; })));  // length for ndim 2
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[6] = 1; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[7] = 1; })));  // reserved
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[60] = 1; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[5] = 2; })));  // unknown flags
  CHECK_THROWS(bad, decode(with([](std::string& s) { s[5] = '\x81'; })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 32, 0); })));  // generation 0
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 24, ~uint64_t{0}); })));  // nil
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 24, (uint64_t{1} << 48) | 65); })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 24, uint64_t{4096} << 48); })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 48, (uint64_t{1} << 40) + 1); })));
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 64, ~uint64_t{0}); })));  // -1
  CHECK_THROWS(bad, decode(with([](std::string& s) { poke64(s, 72, uint64_t{1} << 63); })));
  // 65 dimensions with the length that would match them.
  {
    std::string s = good.substr(0, 64);
    s[6] = 65;
    s.append(16 * 65, '\0');
    CHECK_THROWS(bad, decode(s));
    s[6] = static_cast<char>(255);
    s.append(16 * (255 - 65), '\0');
    CHECK_THROWS(bad, decode(s));
  }
  // The byte extent overflows, or reaches below the block.
  {
    Handle h = base;
    h.shape[0] = int64_t{1} << 62;
    h.strides[0] = int64_t{1} << 40;
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h = base;
    h.shape[0] = INT64_MAX;
    h.strides[0] = INT64_MIN;
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h = base;
    h.strides[0] = -32;  // view_offset 0: the first row would start at -64
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h.view_offset = 64;
    CHECK_NOTHROW(decode(encode_handle(h)));
    h = base;
    h.view_offset = uint64_t{1} << 62;
    CHECK_THROWS(bad, decode(encode_handle(h)));
    h.shape[1] = 0;  // empty, but its offset is still out of range
    h.view_offset = (uint64_t{1} << 62) + 1;
    CHECK_THROWS(bad, decode(encode_handle(h)));
  }
  // Every rejection is kInvalidHandle, never another kind or a crash.
  std::mt19937_64 rng(7);
  const std::string prefix = good.substr(0, 8);
  uint64_t decoded = 0, refused = 0;
  for (int i = 0; i < 100000; ++i) {
    std::string s;
    switch (rng() % 4) {
      case 0: {  // random bytes
        s.resize(rng() % (kHandleFixedBytes + 16 * 70));
        for (char& c : s) c = static_cast<char>(rng());
        break;
      }
      case 1: {  // a plausible header, random body
        uint32_t ndim = static_cast<uint32_t>(rng() % 70);
        s.resize(kHandleFixedBytes + 16 * ndim + (rng() % 8 == 0 ? rng() % 3 : 0));
        for (char& c : s) c = static_cast<char>(rng() % 3 ? 0 : rng());
        std::memcpy(s.data(), prefix.data(), std::min<size_t>(8, s.size()));
        if (s.size() > 6) s[6] = static_cast<char>(ndim);
        if (s.size() > 5) s[5] = static_cast<char>(rng() % 3);
        if (s.size() > 32 && rng() % 2) s[32] = 1;
        break;
      }
      case 2: {  // a valid handle with a few bytes or bits changed
        s = encode_handle(random_handle(rng));
        for (int k = 1 + static_cast<int>(rng() % 4); k > 0; --k) {
          size_t at = rng() % s.size();
          if (rng() % 2)
            s[at] = static_cast<char>(rng());
          else
            s[at] = static_cast<char>(s[at] ^ (1 << (rng() % 8)));
        }
        break;
      }
      default: {  // a valid handle cut short or extended
        s = encode_handle(random_handle(rng));
        if (rng() % 2)
          s.resize(rng() % s.size());
        else
          s.append(1 + rng() % 32, static_cast<char>(rng()));
        break;
      }
    }
    try {
      Handle h = decode(s);
      ++decoded;
      CHECK(encode_handle(h) == s);
      uint64_t lo, hi;
      CHECK(view_extent(h, &lo, &hi) && lo <= hi);
    } catch (const CoreError& e) {
      ++refused;
      if (e.kind() != ErrorKind::kInvalidHandle)
        record_failure(__FILE__, __LINE__, std::string("fuzz: wrong kind: ") + e.what());
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("fuzz: unexpected exception: ") + e.what());
    }
  }
  CHECK(decoded > 5000);
  CHECK(refused > 50000);
}

TEST(handle_view_extent) {
  Handle h;
  uint64_t lo = 1, hi = 1;
  // ndim 0: one item.
  h.view_offset = 64;
  h.itemsize = 8;
  CHECK(view_extent(h, &lo, &hi) && lo == 64 && hi == 72);
  // Contiguous 1-d.
  h.ndim = 1;
  h.shape[0] = 10;
  h.strides[0] = 8;
  h.view_offset = 0;
  CHECK(view_extent(h, &lo, &hi) && lo == 0 && hi == 80);
  // Negative stride: elements at 100, 92, 84.
  h.view_offset = 100;
  h.shape[0] = 3;
  h.strides[0] = -8;
  CHECK(view_extent(h, &lo, &hi) && lo == 84 && hi == 108);
  // Mixed signs in 2-d: rows at 64, 32, 0; columns +0..+24.
  h.ndim = 2;
  h.view_offset = 64;
  h.shape[0] = 3;
  h.strides[0] = -32;
  h.shape[1] = 4;
  h.strides[1] = 8;
  CHECK(view_extent(h, &lo, &hi) && lo == 0 && hi == 96);
  // Broadcast (stride 0): one item whatever the shape.
  h.ndim = 1;
  h.view_offset = 16;
  h.shape[0] = 1000;
  h.strides[0] = 0;
  CHECK(view_extent(h, &lo, &hi) && lo == 16 && hi == 24);
  // Empty shapes touch nothing, whatever the strides.
  h.ndim = 2;
  h.view_offset = 40;
  h.shape[0] = 0;
  h.strides[0] = -1000;
  h.shape[1] = 5;
  h.strides[1] = 1 << 20;
  CHECK(view_extent(h, &lo, &hi) && lo == 40 && hi == 40);
  h.shape[0] = 5;
  h.shape[1] = 0;
  CHECK(view_extent(h, &lo, &hi) && lo == 40 && hi == 40);
  // Below zero, and overflow.
  h.ndim = 1;
  h.view_offset = 8;
  h.shape[0] = 3;
  h.strides[0] = -8;
  CHECK(!view_extent(h, &lo, &hi));
  h.view_offset = 0;
  h.shape[0] = INT64_MAX;
  h.strides[0] = INT64_MAX;
  CHECK(!view_extent(h, &lo, &hi));
  h.strides[0] = INT64_MIN;
  CHECK(!view_extent(h, &lo, &hi));
  h.ndim = kMaxDims;
  for (uint32_t i = 0; i < kMaxDims; ++i) {
    h.shape[i] = int64_t{1} << 40;
    h.strides[i] = int64_t{1} << 22;
  }
  CHECK(!view_extent(h, &lo, &hi));  // each term is fine, the sum is not
}

// ================================================================ futex lock

struct AlwaysAlive : OwnerProbe {
  bool owner_alive(uint32_t) override { return true; }
};

// Asks about one child process: dead once waitpid has reaped it.
struct ChildProbe : OwnerProbe {
  explicit ChildProbe(pid_t p) : pid(p) {}
  bool owner_alive(uint32_t owner) override {
    last_owner.store(owner);
    calls.fetch_add(1);
    if (!reaped) {
      int st;
      if (::waitpid(pid, &st, WNOHANG) == pid) reaped = true;
    }
    return !reaped;
  }
  pid_t pid;
  bool reaped = false;
  std::atomic<uint32_t> last_owner{0};
  std::atomic<int> calls{0};
};

// A read-modify-write with a gap between the read and the write, so that
// two holders of a broken lock lose updates reliably.
void slow_increment(uint64_t* counter) {
  volatile uint64_t* c = counter;
  uint64_t v = *c;
  for (int i = 0; i < 8; ++i) cpu_relax();
  *c = v + 1;
}

TEST(futex_lock_threads) {
  LockWord w{0};
  uint64_t counter = 0;
  std::atomic<int> unclean{0}, started{0};
  auto work = [&](uint32_t me) {
    AlwaysAlive probe;
    started.fetch_add(1);
    while (started.load() < 2) {
    }
    for (int i = 0; i < 1000000; ++i) {
      if (futex_lock::lock(w, me, probe) != Acquired::kClean) unclean.fetch_add(1);
      slow_increment(&counter);
      futex_lock::unlock(w);
    }
  };
  std::thread t1(work, 1), t2(work, 2);
  t1.join();
  t2.join();
  CHECK_EQ(counter, 2000000u);
  CHECK_EQ(unclean.load(), 0);
  CHECK_EQ(w.load(), 0u);
  // try_lock and owner_of.
  CHECK(futex_lock::try_lock(w, 5));
  CHECK(!futex_lock::try_lock(w, 6));
  CHECK_EQ(futex_lock::owner_of(w.load()), 5u);
  futex_lock::unlock(w);
  CHECK_EQ(w.load(), 0u);
}

TEST(futex_lock_processes) {
  struct Shared {
    LockWord w;
    std::atomic<uint32_t> started;
    uint64_t counter;
  };
  void* m = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(m != MAP_FAILED);
  Shared* sh = static_cast<Shared*>(m);
  new (sh) Shared{};
  auto work = [sh](uint32_t me) {
    AlwaysAlive probe;
    sh->started.fetch_add(1);
    while (sh->started.load() < 2) {
    }
    for (int i = 0; i < 200000; ++i) {
      futex_lock::lock(sh->w, me, probe);
      slow_increment(&sh->counter);
      futex_lock::unlock(sh->w);
    }
  };
  pid_t pid = spawn([&] {
    work(2);
    return 0;
  });
  work(1);
  CHECK_EQ(wait_child(pid), 0);
  CHECK_EQ(sh->counter, 400000u);
  CHECK_EQ(sh->w.load(), 0u);
  ::munmap(m, 4096);
}

TEST(futex_lock_dead_owner_takeover) {
  void* m = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(m != MAP_FAILED);
  auto* w = new (m) LockWord{0};
  Pipe ready;
  pid_t pid = spawn([&]() -> int {
    AlwaysAlive probe;
    futex_lock::lock(*w, 7, probe);
    char c = 1;
    write_all(ready.w, &c, 1);
    for (;;) ::pause();
  });
  ready.close_w();
  char c;
  REQUIRE(read_all(ready.r, &c, 1));
  CHECK(!futex_lock::try_lock(*w, 1));

  ChildProbe probe(pid);
  std::atomic<bool> done{false};
  Acquired how = Acquired::kClean;
  std::thread waiter([&] {
    how = futex_lock::lock(*w, 1, probe);
    done.store(true);
  });
  // While the owner lives, the waiter sleeps and keeps asking about it.
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  CHECK(!done.load());
  CHECK(probe.calls.load() >= 3);
  CHECK_EQ(probe.last_owner.load(), 7u);
  auto t0 = Clock::now();
  ::kill(pid, SIGKILL);
  while (!done.load() && seconds_since(t0) < 3)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const double took = seconds_since(t0);
  if (!done.load()) {
    record_failure(__FILE__, __LINE__, "the lock of a dead owner was not taken over");
    w->store(0);  // unstick the waiter
    futex_wake(w, 1);
  }
  waiter.join();
  CHECK(how == Acquired::kFromDeadOwner);
  CHECK(took < 2.0);
  CHECK_EQ(futex_lock::owner_of(w->load()), 1u);
  futex_lock::unlock(*w);
  CHECK_EQ(w->load(), 0u);
  if (!probe.reaped) wait_child(pid);
  AlwaysAlive alive;
  CHECK(futex_lock::lock(*w, 2, alive) == Acquired::kClean);
  futex_lock::unlock(*w);
  ::munmap(m, 4096);
}

// A lock held for a while by a live owner is handed over cleanly.
TEST(futex_lock_contended_handoff) {
  LockWord w{0};
  AlwaysAlive probe;
  REQUIRE(futex_lock::lock(w, 1, probe) == Acquired::kClean);
  std::atomic<bool> got{false};
  Acquired how = Acquired::kFromDeadOwner;
  std::thread t([&] {
    AlwaysAlive p2;
    how = futex_lock::lock(w, 2, p2);
    got.store(true);
    futex_lock::unlock(w);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(60));
  CHECK(!got.load());
  CHECK(w.load() & futex_lock::kContended);  // the sleeper marked the word
  futex_lock::unlock(w);
  t.join();
  CHECK(got.load());
  CHECK(how == Acquired::kClean);
  CHECK_EQ(w.load(), 0u);
}

// ============================================================ process table

TEST(process_table) {
  const pid_t me = ::getpid();
  bool zombie = true;
  const uint64_t st = process_start_time(me, &zombie);
  CHECK(st != 0);
  CHECK(!zombie);
  CHECK_EQ(process_start_time(me), st);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK_EQ(process_start_time(me), st);
  CHECK_EQ(process_start_time(4194304 + 1), 0u);  // above any pid_max

  auto t = std::make_unique<ProcessTable>();
  const uint64_t now = monotonic_ns();
  std::set<int> got;
  for (uint32_t i = 0; i < kMaxSlots; ++i) got.insert(t->claim(slot_id(me, SlotKind::kActive), {}));
  CHECK_EQ(got.size(), size_t{kMaxSlots});
  CHECK(!got.count(-1));
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), -1);
  t->release(5);
  t->release(77);
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), 5);
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), 77);
  CHECK_EQ(t->claim(slot_id(me, SlotKind::kActive), {}), -1);
  for (uint32_t i = 0; i < kMaxSlots; ++i) t->release(i);
  for (uint32_t i = 0; i < kMaxSlots; ++i) CHECK_EQ(t->slots[i].id.load(), 0u);
  CHECK(!t->alive(0, now));  // a free slot has no live owner

  const uint64_t id = slot_id(me, SlotKind::kActive);
  CHECK_EQ(slot_pid(id), me);
  CHECK(slot_kind(id) == SlotKind::kActive);
  int s = t->claim(id, {});
  REQUIRE(s == 0);
  CHECK(t->alive(0, now));  // start time not written yet: alive
  t->slots[0].start_time.store(st);
  CHECK(t->alive(0, now));
  t->slots[0].start_time.store(st + 1);  // the pid now names a newer process
  CHECK(!t->alive(0, now));
  t->slots[0].start_time.store(st);

  // A reservation for a fork child lives for the grace period.
  int r = t->claim(slot_id(me, SlotKind::kReserved), {});
  REQUIRE(r == 1);
  t->slots[1].reserved_at_ns.store(now);
  CHECK(t->alive(1, now));
  CHECK(t->alive(1, now + kReservationGraceNs - 1));
  CHECK(!t->alive(1, now + kReservationGraceNs + 1));

  // A child: alive, then a zombie (dead), then reaped (dead).
  Pipe go;
  pid_t pid = spawn([&] {
    char c;
    read_all(go.r, &c, 1);
    return 0;
  });
  go.close_r();
  REQUIRE(t->claim(slot_id(pid, SlotKind::kActive), {}) == 2);
  const uint64_t cst = process_start_time(pid);
  CHECK(cst != 0);
  t->slots[2].start_time.store(cst);
  CHECK(t->alive(2, monotonic_ns()));
  char c = 1;
  write_all(go.w, &c, 1);
  siginfo_t info{};
  CHECK(::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) == 0);
  bool z = false;
  CHECK_EQ(process_start_time(pid, &z), cst);  // a zombie still has its /proc entry
  CHECK(z);
  CHECK(!t->alive(2, monotonic_ns()));
  CHECK_EQ(wait_child(pid), 0);
  CHECK_EQ(process_start_time(pid), 0u);
  CHECK(!t->alive(2, monotonic_ns()));

  // A process out of file descriptors cannot read /proc, which must not
  // make it think that a live owner is dead (and reclaim its blocks).
  pid = spawn([&] {
    struct rlimit rl;
    CHILD_CHECK(::getrlimit(RLIMIT_NOFILE, &rl) == 0);
    rl.rlim_cur = 32;
    CHILD_CHECK(::setrlimit(RLIMIT_NOFILE, &rl) == 0);
    while (::open("/dev/null", O_RDONLY) >= 0) {
    }
    CHILD_CHECK(errno == EMFILE);
    CHILD_CHECK(t->alive(0, monotonic_ns()));  // slot 0: the parent, alive
    return 0;
  });
  CHECK_EQ(wait_child(pid), 0);
}

// ====================================================================== pool

std::string new_token() {
  std::string t = random_token();
  g_tokens.push_back(t);
  return t;
}

std::vector<std::string> shm_entries(const std::string& token) {
  return list_segments(std::string(kShmPrefix) + token);
}

bool shm_exists(const std::string& name) {  // name as given to shm_open: "/pyarraypool-..."
  return ::access(("/dev/shm" + name).c_str(), F_OK) == 0;
}

PoolConfig make_config(uint64_t max_bytes, uint64_t segment_bytes,
                       uint64_t timeout_ns = 30'000'000'000ull) {
  return PoolConfig{max_bytes, segment_bytes, timeout_ns};
}

// Leaves the pool when the test ends, also when it fails half-way.
class Attached {
 public:
  Attached(const std::string& token, const PoolConfig& cfg) : p_(Pool::attach(token, cfg)) {}
  ~Attached() {
    if (p_ && !p_->left()) {
      try {
        p_->leave();
      } catch (...) {
      }
    }
  }
  Attached(const Attached&) = delete;
  Attached& operator=(const Attached&) = delete;
  Pool* operator->() { return p_.get(); }
  Pool& operator*() { return *p_; }

 private:
  std::unique_ptr<Pool> p_;
};

Handle handle_of(const Pool& p, const Block& b, uint8_t flags) {
  Handle h;
  h.pool = p.id();
  h.ref = b.ref;
  h.generation = b.generation;
  h.flags = flags;
  h.itemsize = 1;
  h.ndim = 1;
  h.shape[0] = static_cast<int64_t>(b.capacity);
  h.strides[0] = 1;
  return h;
}

// As the binding does: through the bytes, then the extent, then the pool.
std::optional<Block> attach_handle(Pool& p, const Handle& h) {
  Handle d = decode(encode_handle(h));
  uint64_t lo, hi;
  if (!view_extent(d, &lo, &hi)) throw CoreError(ErrorKind::kInvalidHandle, "extent");
  return p.attach_block(d, lo, hi, Mode::kSlow);
}

// 8. Pool.
TEST(pool_attach_allocate_release_leave) {
  const std::string tok = new_token();
  CHECK(Pool::attach_existing(tok) == nullptr);
  CHECK_THROWS(ErrorKind::kPool, Pool::attach("not-a-token", make_config(1 << 20, 1 << 20)));
  CHECK_THROWS(ErrorKind::kPool, Pool::attach(new_token(), make_config(0, 1 << 20)));
  const PoolConfig cfg = make_config(64u << 20, 4u << 20, 123456789);
  Attached p(tok, cfg);
  CHECK(shm_exists(control_name(tok)));
  CHECK(p->config() == cfg);
  CHECK_EQ(p->token(), tok);
  PoolStats s = p->stats();
  CHECK_EQ(s.segments, 0u);
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK(s.pids.size() == 1 && s.pids[0] == ::getpid());
  // The first block needs a new segment, a system call: kFast declines.
  CHECK(!p->allocate(100, false, Mode::kFast));
  CHECK_EQ(p->stats().segments, 0u);

  std::vector<Block> blocks;
  uint64_t expect_used = 0;
  for (uint64_t n : {uint64_t{1000}, uint64_t{0}, uint64_t{1}, uint64_t{63}, uint64_t{64},
                     uint64_t{65}, uint64_t{4095}, uint64_t{1} << 20, uint64_t{3} << 20}) {
    auto b = p->allocate(n, false, Mode::kSlow);
    REQUIRE(b);
    CHECK(reinterpret_cast<uintptr_t>(b->payload) % 64 == 0);
    CHECK(b->capacity >= n);
    CHECK(b->generation != 0);
    CHECK_EQ(b->flags, 0u);
    fill_pattern(b->payload, b->capacity, splitmix(b->generation));
    blocks.push_back(*b);
    expect_used += Allocator::block_size_for(n);
  }
  CHECK(shm_entries(tok).size() >= 2);  // the control segment and a data segment
  s = p->stats();
  CHECK_EQ(s.used_bytes, expect_used);
  CHECK_EQ(s.live_blocks, uint64_t{blocks.size()});
  CHECK(s.segments >= 1);
  CHECK_EQ(s.free_bytes, s.capacity_bytes - s.used_bytes);
  CHECK(s.largest_free_block <= s.free_bytes);
  // With a segment mapped and the lock free, kFast works.
  auto f = p->allocate(10, false, Mode::kFast);
  CHECK(f);
  if (f) CHECK(p->release(f->ref, f->generation, Mode::kFast));
  CHECK_NOTHROW(p->verify());
  for (const Block& b : blocks) {
    CHECK(check_pattern(b.payload, b.capacity, splitmix(b.generation)));
    CHECK(p->release(b.ref, b.generation, Mode::kSlow));
  }
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.free_bytes, s.capacity_bytes);
  CHECK_NOTHROW(p->verify());
  const uint32_t segs = s.segments;
  p->leave();
  CHECK(p->left());
  CHECK(shm_entries(tok).empty());
  CHECK(!shm_exists(control_name(tok)));
  CHECK(segs >= 1);
  CHECK_NOTHROW(p->leave());  // a second leave is a no-op
}

TEST(pool_pending_transfers) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20));
  auto b = p->allocate(5000, true, Mode::kSlow);
  REQUIRE(b);
  CHECK_EQ(b->flags, kFlagTransferRequired);
  fill_pattern(b->payload, b->capacity, 42);
  CHECK(p->add_pending(b->ref, b->generation, Mode::kSlow));
  CHECK(p->add_pending(b->ref, b->generation, Mode::kFast));
  PoolStats s = p->stats();
  CHECK_EQ(s.pending_transfers, 2u);
  CHECK_EQ(s.pending_blocks, 1u);
  // Released by its only holder, the block lives on for the two pickles.
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  s = p->stats();
  CHECK_EQ(s.live_blocks, 1u);
  CHECK_EQ(s.used_bytes, Allocator::block_size_for(5000));
  CHECK_NOTHROW(p->verify());
  const Handle h = handle_of(*p, *b, kHandleFlagTransferRequired);
  auto a1 = attach_handle(*p, h);
  REQUIRE(a1);
  CHECK(a1->payload == b->payload && a1->capacity == b->capacity);
  CHECK(check_pattern(a1->payload, a1->capacity, 42));
  CHECK_EQ(p->stats().pending_transfers, 1u);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().live_blocks, 1u);  // one pickle still in flight
  auto a2 = attach_handle(*p, h);
  REQUIRE(a2);
  s = p->stats();
  CHECK_EQ(s.pending_transfers, 0u);
  CHECK_EQ(s.pending_blocks, 0u);
  // A third load of an exhausted handle still works while the block is held,
  // and does not drive the count below zero.
  auto a3 = attach_handle(*p, h);
  CHECK(a3);
  CHECK_EQ(p->stats().pending_transfers, 0u);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  CHECK_NOTHROW(p->verify());

  // Without transfer tracking: add_pending is a no-op, release frees.
  auto c = p->allocate(300, false, Mode::kSlow);
  REQUIRE(c);
  CHECK(p->add_pending(c->ref, c->generation, Mode::kSlow));
  CHECK_EQ(p->stats().pending_transfers, 0u);
  CHECK(p->release(c->ref, c->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, handle_of(*p, *c, 0)));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->release(c->ref, c->generation, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->add_pending(c->ref, c->generation, Mode::kSlow));
  CHECK_NOTHROW(p->verify());
}

TEST(pool_pending_expires) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20, 200'000'000));  // 200 ms
  auto b = p->allocate(1000, true, Mode::kSlow);
  REQUIRE(b);
  CHECK(p->add_pending(b->ref, b->generation, Mode::kSlow));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->collect(), 0u);  // not expired yet
  CHECK_EQ(p->stats().live_blocks, 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_EQ(p->collect(), Allocator::block_size_for(1000));
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.pending_transfers, 0u);
  CHECK_EQ(s.pending_blocks, 0u);
  CHECK_THROWS(ErrorKind::kStaleHandle,
               attach_handle(*p, handle_of(*p, *b, kHandleFlagTransferRequired)));
  CHECK_NOTHROW(p->verify());
}

TEST(pool_refuses_bad_handles) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20));
  auto b = p->allocate(1000, false, Mode::kSlow);
  REQUIRE(b);
  const uint64_t seg_size = p->stats().capacity_bytes;
  const Handle good = handle_of(*p, *b, 0);

  Handle h = good;
  h.generation += 1;
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->release(b->ref, b->generation + 1, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kStaleHandle, p->add_pending(b->ref, b->generation + 1, Mode::kSlow));
  h = good;
  h.ref = BlockRef(0, seg_size);
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  h.ref = BlockRef(0, seg_size + 64 * 1000);
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  CHECK_THROWS(ErrorKind::kInvalidHandle, p->release(h.ref, h.generation, Mode::kSlow));
  h.ref = BlockRef(7, 0);  // a segment this pool does not have
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  h = good;
  h.pool = PoolId::from_token(random_token());
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  // Bytes beyond the block, or a reversed range.
  CHECK_THROWS(ErrorKind::kInvalidHandle, p->attach_block(good, 0, b->capacity + 1, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kInvalidHandle, p->attach_block(good, 10, 5, Mode::kSlow));
  h = good;
  h.shape[0] = static_cast<int64_t>(b->capacity) + 1;
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  h.shape[0] = 10;
  h.view_offset = b->capacity - 9;
  CHECK_THROWS(ErrorKind::kInvalidHandle, attach_handle(*p, h));
  // A stale handle that points into the middle of a live block's payload,
  // where the user's bytes look like a used header: refused by the check.
  std::memset(b->payload, 0, b->capacity);
  auto* fake = reinterpret_cast<BlockHeader*>(b->payload + 64);
  fake->size_flags.store(128 | kUsedBit);
  fake->generation = 99;
  h = good;
  h.ref = BlockRef(b->ref.seg(), b->ref.off() + 128);
  h.generation = 99;
  h.shape[0] = 1;
  CHECK_THROWS(ErrorKind::kStaleHandle, attach_handle(*p, h));
  // The real handle still works; the state is intact.
  CHECK(attach_handle(*p, good));
  CHECK(p->attach_block(good, 0, b->capacity, Mode::kSlow));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
}

TEST(pool_full_and_recovery) {
  const std::string tok = new_token();
  Attached p(tok, make_config(4u << 20, 2u << 20));
  std::vector<Block> blocks;
  ErrorKind kind = ErrorKind::kOs;
  bool threw = false;
  for (int i = 0; i < 100; ++i) {
    try {
      auto b = p->allocate(512u << 10, false, Mode::kSlow);
      REQUIRE(b);
      blocks.push_back(*b);
    } catch (const CoreError& e) {
      threw = true;
      kind = e.kind();
      break;
    }
  }
  CHECK(threw);
  CHECK(kind == ErrorKind::kPoolFull);
  CHECK_EQ(blocks.size(), size_t{6});  // three per 2 MiB segment, two segments
  PoolStats s = p->stats();
  CHECK(s.capacity_bytes <= (4u << 20));
  CHECK_THROWS(ErrorKind::kPoolFull, p->allocate(8u << 20, false, Mode::kSlow));
  CHECK_THROWS(ErrorKind::kPoolFull, p->allocate(uint64_t{1} << 60, false, Mode::kSlow));
  CHECK(!p->allocate(512u << 10, false, Mode::kFast));  // kFast: "not done", no throw
  CHECK_NOTHROW(p->verify());
  // Freeing one block (the first of its segment, so that it does not merge
  // with the free tail) makes room for the same request again.
  REQUIRE(!blocks.empty());
  CHECK(p->release(blocks[0].ref, blocks[0].generation, Mode::kSlow));
  std::optional<Block> again;
  CHECK_NOTHROW(again = p->allocate(512u << 10, false, Mode::kSlow));
  CHECK(again && again->ref == blocks[0].ref);
  if (again)
    blocks[0] = *again;
  else
    blocks.erase(blocks.begin());
  for (const Block& b : blocks) CHECK(p->release(b.ref, b.generation, Mode::kSlow));
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  // The emptied segments are given back, so a request larger than a
  // segment fits within max_bytes; one beyond max_bytes still does not.
  CHECK_THROWS(ErrorKind::kPoolFull, p->allocate(5u << 20, false, Mode::kSlow));
  std::optional<Block> big;
  CHECK_NOTHROW(big = p->allocate(3u << 20, false, Mode::kSlow));
  REQUIRE(big);
  s = p->stats();
  CHECK(s.capacity_bytes <= (4u << 20));
  CHECK_NOTHROW(p->verify());
  CHECK(p->release(big->ref, big->generation, Mode::kSlow));
  CHECK_NOTHROW(p->verify());
}

TEST(pool_grows_across_segments) {
  const std::string tok = new_token();
  Attached p(tok, make_config(256u << 20, 2u << 20));
  std::vector<Block> blocks;
  for (int i = 0; i < 12; ++i) {
    auto b = p->allocate(1u << 20, false, Mode::kSlow);
    REQUIRE(b);
    fill_pattern(b->payload, b->capacity, splitmix(b->generation));
    blocks.push_back(*b);
  }
  PoolStats s = p->stats();
  CHECK(s.segments >= 6);
  std::set<uint32_t> segs_used;
  for (const Block& b : blocks) segs_used.insert(b.ref.seg());
  CHECK(segs_used.size() >= 6);
  CHECK_EQ(shm_entries(tok).size(), size_t{s.segments} + 1);
  CHECK_NOTHROW(p->verify());
  for (const Block& b : blocks) {
    CHECK(check_pattern(b.payload, b.capacity, splitmix(b.generation)));
    CHECK(p->release(b.ref, b.generation, Mode::kSlow));
  }
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

// A request of over 128 MiB in a pool of small segments gets a segment of
// its own, which must then be able to hold it.
TEST(pool_large_block_own_segment) {
  const std::string tok = new_token();
  Attached p(tok, make_config(1u << 30, 2u << 20));
  const uint64_t n = (128u << 20) + 1;
  std::optional<Block> b;
  CHECK_NOTHROW(b = p->allocate(n, false, Mode::kSlow));
  if (b) {
    CHECK(b->capacity >= n);
    b->payload[0] = 1;
    b->payload[n - 1] = 2;
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  }
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK(s.capacity_bytes <= (132u << 20));  // one segment, not a failed one plus a retry
  CHECK_NOTHROW(p->verify());
}

TEST(pool_leave_not_last) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  Attached p1(tok, cfg);
  Attached p2(tok, cfg);  // a second attachment from the same process
  CHECK(p1->slot() != p2->slot());
  CHECK_EQ(p2->stats().processes, 2u);
  auto b = p1->allocate(2000, true, Mode::kSlow);
  REQUIRE(b);
  fill_pattern(b->payload, b->capacity, 7);
  auto c = p1->allocate(2000, false, Mode::kSlow);
  REQUIRE(c);
  CHECK(p1->add_pending(b->ref, b->generation, Mode::kSlow));
  const Handle h = handle_of(*p1, *b, kHandleFlagTransferRequired);
  p1->leave();
  CHECK(shm_exists(control_name(tok)));  // p2 is still attached
  PoolStats s = p2->stats();
  CHECK_EQ(s.processes, 1u);
  CHECK_EQ(s.live_blocks, 1u);  // c went with p1; b waits for its pickle
  auto got = attach_handle(*p2, h);
  REQUIRE(got);
  CHECK(check_pattern(got->payload, got->capacity, 7));
  CHECK(p2->release(got->ref, got->generation, Mode::kSlow));
  CHECK_EQ(p2->stats().used_bytes, 0u);
  CHECK_NOTHROW(p2->verify());
  p2->leave();
  CHECK(shm_entries(tok).empty());
}

// The instance id is drawn once per pool creation: every attachment sees the
// creator's, and a pool recreated under the same token gets a new one.
TEST(pool_instance_id) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(8u << 20, 2u << 20);
  std::string first;
  {
    Attached p1(tok, cfg);
    Attached p2(tok, cfg);
    first = p1->instance_id();
    CHECK_EQ(first.size(), size_t{32});
    CHECK(valid_token(first));  // 32 lowercase hex digits, like a token
    CHECK_EQ(p2->instance_id(), first);
    CHECK(first != std::string(32, '0'));
  }
  CHECK(shm_entries(tok).empty());
  Attached again(tok, cfg);
  CHECK(again->instance_id() != first);
  Attached other(new_token(), cfg);
  CHECK(other->instance_id() != again->instance_id());
  const std::string boot = boot_id();
  CHECK_EQ(boot.size(), size_t{36});  // a UUID, without its newline
  CHECK_EQ(boot_id(), boot);
}

TEST(pool_handle_from_dead_child) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  Attached p(tok, cfg);
  Pipe out;
  const uint64_t n = 100000, word = 0x0123456789abcdefull;
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);  // its own slot; the parent's Pool is not used here
    auto b = c->allocate(n, true, Mode::kSlow);
    CHILD_CHECK(b);
    fill_pattern(b->payload, b->capacity, word);
    CHILD_CHECK(c->add_pending(b->ref, b->generation, Mode::kSlow));
    CHILD_CHECK(write_string(out.w, encode_handle(handle_of(*c, *b, kHandleFlagTransferRequired))));
    return 0;  // _exit without leave(): its slot and its hold stay behind
  });
  out.close_w();
  auto bytes = read_string(out.r);
  CHECK_EQ(wait_child(pid), 0);
  REQUIRE(bytes);
  Handle h = decode(*bytes);
  auto b = attach_handle(*p, h);  // maps the segment the child created
  REQUIRE(b);
  CHECK(b->capacity >= n);
  CHECK(check_pattern(b->payload, b->capacity, word));
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  // The dead child still holds the block until a collection notices.
  CHECK_EQ(p->collect(), Allocator::block_size_for(n));
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

// The snapshot counts blocks by power-of-two size class, per holder slot
// (a shared block counts for each) and per pending block with its sender.
TEST(pool_snapshot) {
  const std::string tok = new_token();
  Attached p1(tok, make_config(64u << 20, 8u << 20));
  Attached p2(tok, make_config(64u << 20, 8u << 20));
  const uint64_t n[3] = {1000, 100000, 3000000};
  std::vector<Block> blocks;
  uint64_t total = 0;
  for (uint64_t bytes : n) {
    auto b = p1->allocate(bytes, true, Mode::kSlow);
    REQUIRE(b);
    blocks.push_back(*b);
    total += Allocator::block_size_for(bytes);
  }
  CHECK(p1->add_pending(blocks[1].ref, blocks[1].generation, Mode::kSlow));
  CHECK(p1->add_pending(blocks[1].ref, blocks[1].generation, Mode::kSlow));
  // p2 takes one block through a handle that does not consume a pickle.
  auto shared = attach_handle(*p2, handle_of(*p1, blocks[2], 0));
  REQUIRE(shared);
  PoolSnapshot s = p1->snapshot();
  CHECK_EQ(s.stats.used_bytes, total);
  CHECK_EQ(s.instance, p1->instance_id());
  uint64_t used = 0, free_bytes = 0, used_blocks = 0;
  for (const SizeClassStats& c : s.size_classes) {
    CHECK((c.min_size & (c.min_size - 1)) == 0);
    used += c.used_bytes;
    free_bytes += c.free_bytes;
    used_blocks += c.used_blocks;
  }
  CHECK_EQ(used, total);
  CHECK_EQ(free_bytes, s.stats.free_bytes);
  CHECK_EQ(used_blocks, 3u);
  REQUIRE(s.processes.size() == 2);
  CHECK_EQ(s.processes[0].slot, p1->slot());  // most bytes first
  CHECK_EQ(s.processes[0].blocks, 3u);
  CHECK_EQ(s.processes[0].bytes, total);
  CHECK_EQ(s.processes[1].slot, p2->slot());
  CHECK_EQ(s.processes[1].blocks, 1u);
  CHECK_EQ(s.processes[1].bytes, Allocator::block_size_for(n[2]));
  CHECK_EQ(s.processes[1].pid, static_cast<int>(::getpid()));
  REQUIRE(s.pending.size() == 1);
  CHECK_EQ(s.pending[0].pickles, 2u);
  CHECK_EQ(s.pending[0].block_size, Allocator::block_size_for(n[1]));
  CHECK_EQ(s.pending[0].sender_pid, static_cast<int>(::getpid()));
  CHECK(s.pending[0].age_ns < 30'000'000'000ull);
  CHECK(s.pending[0].expires_in_ns > 0);
  CHECK_EQ(s.pending_bytes, Allocator::block_size_for(n[1]));
  const std::string usage = describe_usage(s);
  CHECK(usage.find("pid " + std::to_string(::getpid()) + ": ") != std::string::npos);
  CHECK(usage.find("(" + std::to_string(total) + " bytes) in 3 blocks") != std::string::npos);
  CHECK(usage.find("2 pickles pending") != std::string::npos);
  // The sender pid is no flag: handles and Blocks see only the flags.
  auto again = attach_handle(*p2, handle_of(*p1, blocks[1], kHandleFlagTransferRequired));
  REQUIRE(again);
  CHECK_EQ(again->flags, kFlagTransferRequired);
  CHECK_EQ(p1->inspect_block(blocks[1].ref).flags, kFlagTransferRequired);
  CHECK(!p1->has_events());
  CHECK_NOTHROW(p1->verify());
}

// Maintenance records one event per dead process it reclaims from and per
// sender whose pickles it drops; leaving is no event.
TEST(pool_events) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20, 200'000'000);  // 200 ms
  Attached p(tok, cfg);
  Pipe out;
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);
    for (uint64_t bytes : {uint64_t{5000}, uint64_t{70000}})
      CHILD_CHECK(c->allocate(bytes, false, Mode::kSlow));
    CHILD_CHECK(write_string(out.w, "ready"));
    return 0;  // _exit without leave(): dead, holding two blocks
  });
  out.close_w();
  CHECK(read_string(out.r));
  CHECK_EQ(wait_child(pid), 0);
  const uint64_t held = Allocator::block_size_for(5000) + Allocator::block_size_for(70000);
  CHECK_EQ(p->collect(), held);
  REQUIRE(p->has_events());
  uint64_t dropped = 1;
  std::vector<PoolEvent> ev = p->take_events(&dropped);
  CHECK_EQ(dropped, 0u);
  CHECK(!p->has_events());
  REQUIRE(ev.size() == 1);
  CHECK(ev[0].kind == PoolEvent::Kind::kReclaim);
  CHECK_EQ(ev[0].pid, static_cast<int>(pid));
  CHECK(!ev[0].reserved);
  CHECK_EQ(ev[0].blocks, 2u);
  CHECK_EQ(ev[0].bytes, held);
  CHECK_EQ(ev[0].freed_bytes, held);
  const std::string msg = describe(ev[0]);
  CHECK(msg.find("dead process pid " + std::to_string(pid)) != std::string::npos);
  CHECK(msg.find(std::to_string(held) + " bytes") != std::string::npos);
  p->collect();
  CHECK(!p->has_events());  // reported once

  // Two pickles of one block and one of another, never loaded; one block is
  // still held, so only the other goes back.
  auto a = p->allocate(1000, true, Mode::kSlow);
  auto b = p->allocate(9000, true, Mode::kSlow);
  REQUIRE(a);
  REQUIRE(b);
  CHECK(p->add_pending(a->ref, a->generation, Mode::kSlow));
  CHECK(p->add_pending(a->ref, a->generation, Mode::kSlow));
  CHECK(p->add_pending(b->ref, b->generation, Mode::kSlow));
  CHECK(p->release(a->ref, a->generation, Mode::kSlow));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_EQ(p->collect(), Allocator::block_size_for(1000));
  ev = p->take_events(&dropped);
  REQUIRE(ev.size() == 1);
  CHECK(ev[0].kind == PoolEvent::Kind::kExpiry);
  CHECK_EQ(ev[0].pid, static_cast<int>(::getpid()));
  CHECK_EQ(ev[0].blocks, 2u);
  CHECK_EQ(ev[0].pickles, 3u);
  CHECK_EQ(ev[0].bytes, Allocator::block_size_for(1000) + Allocator::block_size_for(9000));
  CHECK_EQ(ev[0].freed_bytes, Allocator::block_size_for(1000));
  CHECK(ev[0].age_ns >= 200'000'000ull && ev[0].age_ns < 30'000'000'000ull);
  CHECK_EQ(ev[0].timeout_ns, 200'000'000ull);
  CHECK(describe(ev[0]).find("3 pickles of 2 blocks") != std::string::npos);
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK(!p->has_events());

  // A bounded queue: what does not fit is counted, not lost silently.
  EventLog log;
  for (size_t i = 0; i < EventLog::kMax + 5; ++i) log.push(PoolEvent{});
  CHECK_EQ(log.drain(&dropped).size(), EventLog::kMax);
  CHECK_EQ(dropped, 5u);
  CHECK(log.empty());
}

// Several processes create the same pool at once: they all end up in one.
TEST(pool_attach_race) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  constexpr int kChildren = 4;
  Pipe go;
  std::vector<std::unique_ptr<Pipe>> outs;
  std::vector<pid_t> pids;
  for (int i = 0; i < kChildren; ++i) {
    outs.push_back(std::make_unique<Pipe>());
    Pipe& out = *outs.back();
    pids.push_back(spawn([&, i] {
      char c;
      CHILD_CHECK(read_all(go.r, &c, 1));
      auto pool = Pool::attach(tok, cfg);
      auto b = pool->allocate(64u * (i + 1), true, Mode::kSlow);
      CHILD_CHECK(b);
      fill_pattern(b->payload, b->capacity, splitmix(static_cast<uint64_t>(i)));
      CHILD_CHECK(pool->add_pending(b->ref, b->generation, Mode::kSlow));
      CHILD_CHECK(
          write_string(out.w, encode_handle(handle_of(*pool, *b, kHandleFlagTransferRequired))));
      return 0;
    }));
  }
  for (auto& o : outs) o->close_w();
  const std::string all(kChildren, 'g');
  CHECK(write_all(go.w, all.data(), all.size()));
  std::vector<std::optional<std::string>> handles;
  for (auto& o : outs) handles.push_back(read_string(o->r));
  for (pid_t pid : pids) CHECK_EQ(wait_child(pid), 0);
  for (const std::string& e : shm_entries(tok)) CHECK(e.find(".init") == std::string::npos);
  Attached p(tok, cfg);
  for (int i = 0; i < kChildren; ++i) {
    if (!handles[i]) {
      record_failure(__FILE__, __LINE__, "child " + std::to_string(i) + " sent no handle");
      continue;
    }
    std::optional<Block> b;
    CHECK_NOTHROW(b = attach_handle(*p, decode(*handles[i])));
    if (!b) continue;
    CHECK(check_pattern(b->payload, b->capacity, splitmix(static_cast<uint64_t>(i))));
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  }
  p->collect();
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

TEST(pool_owner_killed_inside_lock) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  Attached p(tok, cfg);
  auto mine = p->allocate(1000, false, Mode::kSlow);
  REQUIRE(mine);
  Pipe ready;
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);
    auto b = c->allocate(5000, false, Mode::kSlow);  // held by the child: reclaimed after
    CHILD_CHECK(b);
    c->lock_forever();
    char x = 1;
    write_all(ready.w, &x, 1);
    for (;;) ::pause();
  });
  ready.close_w();
  char x;
  REQUIRE(read_all(ready.r, &x, 1));
  // The owner is alive: kFast gives up at once instead of waiting.
  CHECK(!p->allocate(64, false, Mode::kFast));
  CHECK(!p->release(mine->ref, mine->generation, Mode::kFast));
  ::kill(pid, SIGKILL);
  CHECK_EQ(wait_child(pid), 128 + SIGKILL);
  auto t0 = Clock::now();
  std::optional<Block> b;
  CHECK_NOTHROW(b = p->allocate(1000, false, Mode::kSlow));
  CHECK(b);
  CHECK(seconds_since(t0) < 2.0);
  CHECK_NOTHROW(p->verify());
  PoolStats s = p->stats();
  CHECK_EQ(s.live_blocks, 2u);  // ours; the child's went with it
  CHECK_EQ(s.processes, 1u);
  CHECK(p->release(mine->ref, mine->generation, Mode::kSlow));
  if (b) CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

// A process killed inside leave() (a Pool.terminate() SIGTERM reaching a
// worker that is already exiting) leaves the pool marked dead. The next
// attacher settles it: it finishes the removal when nobody needs the pool,
// and otherwise marks it running again.
TEST(pool_last_leaver_killed_while_leaving) {
  using Step = Pool::LeaveStep;
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  for (Step at : {Step::kMarkedDead, Step::kUnlocked, Step::kDataUnlinked}) {
    // Alone on the pool: its leave() was removing it.
    const std::string tok = new_token();
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg);
      CHILD_CHECK(c->allocate(100000, false, Mode::kSlow));  // a data segment exists
      c->die_while_leaving(at);
    });
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    CHECK(shm_exists(control_name(tok)));  // what the killed leaver left
    if (at == Step::kDataUnlinked) CHECK_EQ(shm_entries(tok).size(), size_t{1});
    auto t0 = Clock::now();
    std::unique_ptr<Pool> p;
    CHECK_NOTHROW(p = Pool::attach_existing(tok));
    CHECK(p == nullptr);
    CHECK(shm_entries(tok).empty());
    CHECK(seconds_since(t0) < 3.0);
    {
      Attached fresh(tok, cfg);  // the name is free for a new pool
      auto b = fresh->allocate(1000, false, Mode::kSlow);
      CHECK(b);
      if (b) CHECK(fresh->release(b->ref, b->generation, Mode::kSlow));
    }
    CHECK(shm_entries(tok).empty());
    if (g_failures) return;
  }

  // Killed inside the lock, before it found a survivor: the pool runs on.
  {
    const std::string tok = new_token();
    Attached p(tok, cfg);
    auto mine = p->allocate(3000, false, Mode::kSlow);
    REQUIRE(mine);
    fill_pattern(mine->payload, mine->capacity, 11);
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg);
      CHILD_CHECK(c->allocate(5000, false, Mode::kSlow));
      c->die_while_leaving(Step::kMarkedDead);
    });
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    {
      Attached newcomer(tok, cfg);  // finds the pool marked dead; revives it
      PoolStats s = newcomer->stats();
      CHECK_EQ(s.processes, 2u);
      CHECK_EQ(s.live_blocks, 1u);  // ours; the child's went with it
      CHECK_NOTHROW(newcomer->verify());
    }
    CHECK(check_pattern(mine->payload, mine->capacity, 11));
    CHECK(p->release(mine->ref, mine->generation, Mode::kSlow));
    p->leave();
    CHECK(shm_entries(tok).empty());
  }

  // Killed inside the lock with pickles in flight to the program's root:
  // the root attaches later and loads them.
  {
    const std::string tok = new_token();
    Pipe out;
    const ProgramRoot me{static_cast<int>(::getpid()), process_start_time(::getpid())};
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg, me);
      auto b = c->allocate(5000, true, Mode::kSlow);
      CHILD_CHECK(b);
      fill_pattern(b->payload, b->capacity, 12);
      CHILD_CHECK(c->add_pending(b->ref, b->generation, Mode::kSlow));
      CHILD_CHECK(write_string(out.w, encode_handle(handle_of(*c, *b, kHandleFlagTransferRequired))));
      CHILD_CHECK(c->release(b->ref, b->generation, Mode::kSlow));
      c->die_while_leaving(Step::kMarkedDead);
    });
    out.close_w();
    auto bytes = read_string(out.r);
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    REQUIRE(bytes);
    std::unique_ptr<Pool> p;
    CHECK_NOTHROW(p = Pool::attach_existing(tok));
    REQUIRE(p);
    auto b = attach_handle(*p, decode(*bytes));
    REQUIRE(b);
    CHECK(check_pattern(b->payload, b->capacity, 12));
    CHECK(p->release(b->ref, b->generation, Mode::kSlow));
    CHECK_EQ(p->stats().used_bytes, 0u);
    p->leave();
    CHECK(shm_entries(tok).empty());
  }
}

// Random allocate / check / release traffic; returns the number of problems.
int pool_traffic(Pool& p, uint64_t seed, long ops, uint64_t max_bytes) {
  std::mt19937_64 rng(seed);
  struct Held {
    Block b;
    uint64_t word;
  };
  std::vector<Held> held;
  int bad = 0;
  for (long i = 0; i < ops || !held.empty(); ++i) {
    if (i < ops && held.size() < 12 && (held.empty() || rng() % 2)) {
      uint64_t n = log_uniform(rng, max_bytes);
      auto b = p.allocate(n, false, Mode::kFast);
      if (!b) b = p.allocate(n, false, Mode::kSlow);
      if (!b || b->capacity < n || reinterpret_cast<uintptr_t>(b->payload) % 64 != 0) {
        ++bad;
        continue;
      }
      uint64_t word = splitmix(seed ^ b->generation);
      fill_pattern(b->payload, b->capacity, word);
      held.push_back({*b, word});
    } else {
      size_t k = rng() % held.size();
      const Held& h = held[k];
      bad += !check_pattern(h.b.payload, h.b.capacity, h.word);
      if (!p.release(h.b.ref, h.b.generation, Mode::kFast))
        bad += !p.release(h.b.ref, h.b.generation, Mode::kSlow);
      held[k] = held.back();
      held.pop_back();
    }
  }
  return bad;
}

TEST(pool_processes_share_traffic) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(512u << 20, 4u << 20);
  Attached p(tok, cfg);
  Pipe ready, go;
  std::vector<pid_t> pids;
  for (int i = 0; i < 2; ++i)
    pids.push_back(spawn([&, i] {
      auto c = Pool::attach(tok, cfg);
      char x = 1;
      CHILD_CHECK(write_all(ready.w, &x, 1) && read_all(go.r, &x, 1));  // start together
      int bad = pool_traffic(*c, 100 + i, 4000, 256u << 10);
      c->leave();
      return std::min(bad, 100);
    }));
  ready.close_w();
  char x[2];
  CHECK(read_all(ready.r, x, 2));
  CHECK(write_all(go.w, "gg", 2));
  CHECK_EQ(pool_traffic(*p, 99, 4000, 256u << 10), 0);
  for (pid_t pid : pids) CHECK_EQ(wait_child(pid), 0);
  PoolStats s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK_NOTHROW(p->verify());
  p->leave();
  CHECK(shm_entries(tok).empty());
}

// Processes killed at random points of their pool traffic: whatever they
// were doing, the survivor repairs the pool and gets all of it back.
TEST(pool_processes_killed_anywhere) {
  const std::string tok = new_token();
  const PoolConfig cfg = make_config(512u << 20, 2u << 20);
  Attached p(tok, cfg);
  auto mine = p->allocate(3000, false, Mode::kSlow);
  REQUIRE(mine);
  fill_pattern(mine->payload, mine->capacity, 5);
  std::mt19937_64 rng(8);
  for (int iter = 0; iter < 40; ++iter) {
    const uint64_t seed = rng();
    // Small blocks half of the time: then the child spends much of its time
    // inside the lock, and is often killed there.
    const uint64_t max_bytes = iter % 2 ? 512u << 10 : 2u << 10;
    pid_t pid = spawn([&] {
      auto c = Pool::attach(tok, cfg);
      pool_traffic(*c, seed, LONG_MAX, max_bytes);
      return 0;
    });
    std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng() % 15000));
    ::kill(pid, SIGKILL);
    CHECK_EQ(wait_child(pid), 128 + SIGKILL);
    // First thing after the kill: whatever the child left half done inside
    // the lock must be repaired by the next one to take it.
    CHECK_NOTHROW(p->verify());
    std::optional<Block> b;
    CHECK_NOTHROW(b = p->allocate(100, false, Mode::kSlow));  // may take over the lock
    if (b) CHECK(p->release(b->ref, b->generation, Mode::kSlow));
    CHECK_NOTHROW(p->collect());
    CHECK_NOTHROW(p->verify());
    PoolStats s = p->stats();
    CHECK_EQ(s.live_blocks, 1u);
    CHECK_EQ(s.processes, 1u);
    CHECK(check_pattern(mine->payload, mine->capacity, 5));
    if (g_failures) break;
  }
  CHECK(p->release(mine->ref, mine->generation, Mode::kSlow));
  CHECK_EQ(p->stats().used_bytes, 0u);
  p->leave();
  CHECK(shm_entries(tok).empty());
}

TEST(pool_fork_hooks) {
  const std::string tok = new_token();
  Attached p(tok, make_config(64u << 20, 2u << 20));
  auto b = p->allocate(4096, false, Mode::kSlow);
  REQUIRE(b);
  const uint64_t word = 0xfeedfacecafebeefull;
  fill_pattern(b->payload, b->capacity, word);
  Pipe go;
  p->before_fork({{b->ref, b->generation}});
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 0;
    try {
      rc = [&]() -> int {
        ::alarm(60);
        p->after_fork_child();
        char c;
        CHILD_CHECK(read_all(go.r, &c, 1));  // the parent has released the block
        PoolStats s = p->stats();
        CHILD_CHECK(s.live_blocks >= 1);
        CHILD_CHECK(s.processes == 2);
        CHILD_CHECK(check_pattern(b->payload, b->capacity, word));
        auto a = attach_handle(*p, handle_of(*p, *b, 0));
        CHILD_CHECK(a && a->payload == b->payload);
        p->verify();
        CHILD_CHECK(p->release(b->ref, b->generation, Mode::kSlow));
        CHILD_CHECK(p->stats().live_blocks == 0);
        p->leave();  // not the last: the parent stays
        return 0;
      }();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  child: %s\n", e.what());
      rc = 98;
    }
    ::_exit(rc);
  }
  p->after_fork_parent();
  REQUIRE(pid > 0);
  go.close_r();
  CHECK(p->release(b->ref, b->generation, Mode::kSlow));
  PoolStats s = p->stats();
  CHECK_EQ(s.live_blocks, 1u);  // the child inherited a hold on it
  CHECK_EQ(s.processes, 2u);
  char c = 1;
  CHECK(write_all(go.w, &c, 1));
  CHECK_EQ(wait_child(pid), 0);
  s = p->stats();
  CHECK_EQ(s.used_bytes, 0u);
  CHECK_EQ(s.live_blocks, 0u);
  CHECK_EQ(s.processes, 1u);
  CHECK(shm_exists(control_name(tok)));
  CHECK_NOTHROW(p->verify());
  // The pool still works in the parent after the fork.
  auto d = p->allocate(100, false, Mode::kFast);
  CHECK(d);
  if (d) CHECK(p->release(d->ref, d->generation, Mode::kFast));
  p->leave();
  CHECK(shm_entries(tok).empty());
}

TEST(pool_clean_stale) {
  const PoolConfig cfg = make_config(64u << 20, 2u << 20);
  // A pool with a live process is never stale. (Attached first: creating a
  // pool sweeps stale ones, which would take the dead one made below.)
  const std::string live = new_token();
  Attached q(live, cfg);
  CHECK(q->allocate(10, false, Mode::kSlow));
  const std::string tok = new_token();
  pid_t pid = spawn([&] {
    auto c = Pool::attach(tok, cfg);
    auto b = c->allocate(1000, false, Mode::kSlow);
    CHILD_CHECK(b);
    return 0;  // dies attached
  });
  CHECK_EQ(wait_child(pid), 0);
  const std::vector<std::string> left = shm_entries(tok);
  CHECK_EQ(left.size(), size_t{2});  // control and segment 0
  auto contains_all = [&](const std::vector<std::string>& names) {
    for (const std::string& n : left)
      if (std::find(names.begin(), names.end(), n) == names.end()) return false;
    return true;
  };
  auto mentions_live = [&](const std::vector<std::string>& names) {
    for (const std::string& n : names)
      if (n.find(live) != std::string::npos) return true;
    return false;
  };
  auto dry = Pool::clean_stale(true, "");
  CHECK(contains_all(dry));
  CHECK(!mentions_live(dry));
  CHECK_EQ(shm_entries(tok).size(), size_t{2});  // a dry run removes nothing
  auto kept = Pool::clean_stale(true, tok);
  for (const std::string& n : left) CHECK(std::find(kept.begin(), kept.end(), n) == kept.end());
  auto removed = Pool::clean_stale(false, "");
  CHECK(contains_all(removed));
  CHECK(!mentions_live(removed));
  CHECK(shm_entries(tok).empty());
  CHECK_EQ(shm_entries(live).size(), size_t{2});
  CHECK_NOTHROW(q->verify());
}

// The last test: nothing of any pool this program made is left in /dev/shm.
TEST(no_shm_leftovers) {
  for (const std::string& tok : g_tokens)
    for (const std::string& n : shm_entries(tok)) {
      record_failure(__FILE__, __LINE__, "left in /dev/shm: " + n);
      unlink_segment("/" + n);
    }
}

}  // namespace

// Arguments, if any, select the tests whose names contain one of them.
int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  ::signal(SIGPIPE, SIG_IGN);
  ::signal(SIGALRM, on_alarm);
  int passed = 0, failed = 0;
  const auto t_all = Clock::now();
  for (const TestCase& t : registry()) {
    bool selected = argc <= 1 || std::strcmp(t.name, "no_shm_leftovers") == 0;
    for (int i = 1; i < argc; ++i) selected |= std::strstr(t.name, argv[i]) != nullptr;
    if (!selected) continue;
    g_test = t.name;
    g_failures = 0;
    const auto t0 = Clock::now();
    ::alarm(120);
    try {
      t.fn();
    } catch (const Abandon&) {
    } catch (const std::exception& e) {
      record_failure(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      record_failure(__FILE__, __LINE__, "uncaught non-standard exception");
    }
    ::alarm(0);
    std::printf("%s %s (%.2f s)\n", g_failures ? "[FAIL]" : "[ ok ]", t.name, seconds_since(t0));
    (g_failures ? failed : passed) += 1;
  }
  std::printf("total %.2f s\n", seconds_since(t_all));
  std::printf("core_tests: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
