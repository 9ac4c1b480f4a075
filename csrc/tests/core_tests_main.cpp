// main() of the core tests: runs the registered tests area by area (see
// harness.hpp), then the final checks of the whole run.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "core/shm_segment.hpp"
#include "harness.hpp"
#include "pool_helpers.hpp"

namespace pap::test {
namespace {

constexpr Area kArea = Area::kFinalChecks;

// The last test: nothing of any pool this program made is left in /dev/shm.
TEST(no_shm_leftovers) {
  for (const std::string& tok : g_tokens)
    for (const std::string& n : shm_entries(tok)) {
      record_failure(__FILE__, __LINE__, "left in /dev/shm: " + n);
      unlink_segment("/" + n);
    }
}

extern "C" void on_alarm(int) {
  // Only async-signal-safe calls: a hung test ends the program with a reason.
  const char a[] = "core_tests: timeout in test ";
  ssize_t ignored = ::write(1, a, sizeof a - 1);
  ignored = ::write(1, g_test, std::strlen(g_test));
  ignored = ::write(1, "\n", 1);
  (void)ignored;
  ::_exit(3);
}

// The tests in run order: by area, and within an area in the order of its
// file. False when two files register tests of one area, since the order
// of their registrations is unspecified.
bool in_run_order(std::vector<TestCase>& tests) {
  std::stable_sort(tests.begin(), tests.end(),
                   [](const TestCase& a, const TestCase& b) { return a.area < b.area; });
  for (size_t i = 1; i < tests.size(); ++i)
    if (tests[i].area == tests[i - 1].area && std::strcmp(tests[i].file, tests[i - 1].file) != 0) {
      std::printf("core_tests: %s and %s register tests of the same Area; give each file its own\n",
                  tests[i - 1].file, tests[i].file);
      return false;
    }
  return true;
}

}  // namespace
}  // namespace pap::test

// Arguments, if any, select the tests whose names contain one of them; the
// final checks run always.
int main(int argc, char** argv) {
  using namespace pap::test;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  ::signal(SIGPIPE, SIG_IGN);
  ::signal(SIGALRM, on_alarm);
  std::vector<TestCase>& tests = registry();
  if (!in_run_order(tests)) return 2;
  int passed = 0, failed = 0;
  const auto t_all = Clock::now();
  for (const TestCase& t : tests) {
    bool selected = argc <= 1 || t.area == Area::kFinalChecks;
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
