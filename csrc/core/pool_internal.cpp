#include "core/pool_internal.hpp"

#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "core/pool_snapshot.hpp"
#include "core/shm_segment.hpp"

namespace pap {

uint64_t my_pid_namespace() {
  static const uint64_t ns = [] {
    struct stat st;
    return ::stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
  }();
  return ns;
}

namespace {
// The root's pid means nothing in another pid namespace.
bool judgeable(const ProgramRoot& root) {
  return root.pid_ns == 0 || my_pid_namespace() == 0 || root.pid_ns == my_pid_namespace();
}
}  // namespace

bool is_me(const ProgramRoot& root) {
  return judgeable(root) && root.pid == ::getpid() &&
         root.start_time == process_start_time(::getpid());
}

bool root_alive(const ProgramRoot& root) {
  if (root.pid <= 0) return false;
  if (!judgeable(root)) return true;  // see ProgramRoot
  bool zombie = false;
  uint64_t started = process_start_time(static_cast<pid_t>(root.pid), &zombie);
  return started != 0 && !zombie && started == root.start_time;
}

uint64_t program_id(const ProgramRoot& root) {
  if (root.pid <= 0 || root.start_time == 0) return 0;
  // splitmix64's finalizer over the three fields, folded one by one.
  auto mix = [](uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  };
  const uint64_t h = mix(mix(mix(static_cast<uint64_t>(root.pid)) ^ root.start_time) ^ root.pid_ns);
  return h ? h : 1;  // 0 means "no program"
}

uint64_t realtime_ns() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(ts.tv_nsec);
}

ShmSpace shm_usage() {
  struct statvfs v;
  if (::statvfs("/dev/shm", &v) != 0) return ShmSpace{};
  return ShmSpace{true, static_cast<uint64_t>(v.f_bavail) * v.f_frsize,
                  static_cast<uint64_t>(v.f_blocks) * v.f_frsize};
}

std::string shm_space() {
  const ShmSpace s = shm_usage();
  if (!s.known) return "/dev/shm free space unknown";
  return "/dev/shm has " + human_bytes(s.free_bytes) + " (" + std::to_string(s.free_bytes) +
         " bytes) free of " + human_bytes(s.total_bytes);
}

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

bool wait_initialized(const ControlHeader* h, int ms) {
  for (int i = 0; i < ms; ++i) {
    if (h->magic.load(std::memory_order_acquire) == kMagic) return true;
    sleep_ms(1);
  }
  return h->magic.load(std::memory_order_acquire) == kMagic;
}

void unlink_data_files(const std::string& token) {
  unlink_all_quietly(std::string(kShmPrefix) + token + "-");
  unlink_all_quietly(std::string(kShmPrefix) + token + ".init");
}

void unlink_pool_files(const std::string& token) {
  unlink_data_files(token);
  ::shm_unlink(control_name(token).c_str());
}

}  // namespace pap
