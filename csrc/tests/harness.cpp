// Out-of-line parts of the core tests' harness (see harness.hpp): failure
// recording, forked children and the pipes that talk to them, test data.

#include "harness.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>

namespace pap::test {

std::vector<TestCase>& registry() {
  static std::vector<TestCase> r;
  return r;
}

int g_failures = 0;
const char* g_test = "";

void record_failure(const char* file, int line, const std::string& what) {
  ++g_failures;
  if (g_failures <= 12)
    std::printf("  FAIL %s:%d: %s\n", file, line, what.c_str());
  else if (g_failures == 13)
    std::printf("  (further failures of this test are not shown)\n");
}

namespace {

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

}  // namespace

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

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// --------------------------------------------------------------- processes

pid_t spawn(const std::function<int()>& body) {
  const pid_t pid = fork_child(body, ChildOptions{60, false, "child"});
  REQUIRE(pid >= 0);
  return pid;
}

Pipe::Pipe() {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe failed");
  r = fds[0];
  w = fds[1];
}

void Pipe::close_r() {
  if (r >= 0) ::close(r);
  r = -1;
}

void Pipe::close_w() {
  if (w >= 0) ::close(w);
  w = -1;
}

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

uint64_t log_uniform(std::mt19937_64& rng, uint64_t max) {
  std::uniform_real_distribution<double> d(0.0, std::log(static_cast<double>(max) + 1.0));
  uint64_t v = static_cast<uint64_t>(std::exp(d(rng))) - 1;
  return std::min(v, max);
}

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

}  // namespace pap::test
