// The harness of the standalone core tests (csrc/tests/*_tests.cpp), no Python.
//
// `make core-tests` builds every file of csrc/tests into one program; `make
// asan` runs it under AddressSanitizer and UBSan. There is no framework:
// TEST() registers a function, CHECK() records a failure with its file:line
// and carries on, REQUIRE() records one and abandons the test. Forked
// children never CHECK (their memory is not the parent's): they report
// through their exit status and print only when something fails. Every pool
// is made with a fresh random token (pool_helpers.hpp), and the final check
// fails if an entry of /dev/shm of any of those tokens remains.
//
// Run order. Each test file declares `constexpr Area kArea` for its tests,
// and one area belongs to one file: main() runs the areas in the order of
// the enum below, and an area's tests in the order of its file (C++ orders
// the initialisation of one translation unit, but not that of several). The
// area kFinalChecks runs last and always, also when arguments select tests:
// it checks what the whole run may have left behind.

#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "child_process.hpp"
#include "core/errors.hpp"

namespace pap::test {

// ===================================================================== registry

enum class Area {
  kAllocator,
  kAllocatorRebuild,
  kHandle,
  kFutexLock,
  kProcessTable,
  kPool,
  kPoolReport,
  kPoolProcesses,
  kPoolCrash,
  kPoolFork,
  kCorruption,
  kPoolKeeper,
  kPoolLiveness,
  kPoolScale,
  kPoolMemory,
  kFinalChecks,  // last, and run whatever the arguments select
};

struct TestCase {
  Area area;
  const char* file;  // to check that no two files share an area
  const char* name;
  void (*fn)();
};

std::vector<TestCase>& registry();

struct Register {
  Register(Area area, const char* file, const char* name, void (*fn)()) {
    registry().push_back({area, file, name, fn});
  }
};

#define TEST(name)                                                           \
  void name();                                                               \
  const ::pap::test::Register register_##name(kArea, __FILE__, #name, name); \
  void name()

// ===================================================================== failures

extern int g_failures;      // failures recorded by the running test
extern const char* g_test;  // its name, for the watchdog

struct Abandon {};  // thrown by REQUIRE

void record_failure(const char* file, int line, const std::string& what);

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

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) ::pap::test::record_failure(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b)                                                                    \
  do {                                                                                    \
    const auto& va_ = (a);                                                                \
    const auto& vb_ = (b);                                                                \
    if (!(va_ == vb_))                                                                    \
      ::pap::test::record_failure(__FILE__, __LINE__,                                     \
                                  "CHECK_EQ(" #a ", " #b "): " + ::pap::test::show(va_) + \
                                      " != " + ::pap::test::show(vb_));                   \
  } while (0)

#define REQUIRE(cond)                                                        \
  do {                                                                       \
    if (!(cond)) {                                                           \
      ::pap::test::record_failure(__FILE__, __LINE__, "REQUIRE(" #cond ")"); \
      throw ::pap::test::Abandon{};                                          \
    }                                                                        \
  } while (0)

void check_throws(const std::function<void()>& fn, ErrorKind want, const char* file, int line,
                  const char* text);
void check_nothrow(const std::function<void()>& fn, const char* file, int line, const char* text);

#define CHECK_THROWS(kind, ...) \
  ::pap::test::check_throws([&] { (void)(__VA_ARGS__); }, kind, __FILE__, __LINE__, #__VA_ARGS__)
#define CHECK_NOTHROW(...) \
  ::pap::test::check_nothrow([&] { (void)(__VA_ARGS__); }, __FILE__, __LINE__, #__VA_ARGS__)

// In a forked child: report and return a failure exit status.
#define CHILD_CHECK(cond)                                                                       \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      std::fprintf(stderr, "  child %d: %s:%d: CHECK(%s) failed\n", static_cast<int>(getpid()), \
                   __FILE__, __LINE__, #cond);                                                  \
      return 1;                                                                                 \
    }                                                                                           \
  } while (0)

// ======================================================================== time

// A pause the compiler cannot remove.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  asm volatile("" ::: "memory");
#endif
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0);

// =================================================================== processes

// Runs `body` in a forked child (fork_child in child_process.hpp, which
// also has wait_child); a failed fork fails the test.
pid_t spawn(const std::function<int()>& body);

struct Pipe {
  int r = -1, w = -1;
  Pipe();
  ~Pipe() {
    close_r();
    close_w();
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  void close_r();
  void close_w();
};

bool write_all(int fd, const void* data, size_t n);
bool read_all(int fd, void* data, size_t n);
bool write_string(int fd, const std::string& s);
std::optional<std::string> read_string(int fd);

// ======================================================================== data

uint64_t splitmix(uint64_t x);

// A size in [0, max] drawn log-uniformly (every order of magnitude equally).
uint64_t log_uniform(std::mt19937_64& rng, uint64_t max);

// Fills `n` bytes with the 8-byte `word` repeated; checked with two memcmp
// calls (first word, then "periodic with period 8"), fast enough to cover
// every byte of every block.
void fill_pattern(unsigned char* p, uint64_t n, uint64_t word);
bool check_pattern(const unsigned char* p, uint64_t n, uint64_t word);

}  // namespace pap::test
