// What 64 MiB of fresh memory costs, filled by a copy, by every way this
// kernel offers: the floor under target M3 (docs/benchmarks.md, "Memory").
//
// M3 compares a copy into a growing pool with a copy into fresh numpy memory.
// numpy asks for transparent huge pages (madvise) for large arrays, so its
// 64 MiB takes 32 page faults and 32 huge-page clears. A pool in /dev/shm
// gets the page size of that tmpfs: 4 KiB unless /dev/shm is mounted with
// huge= (or shmem_enabled says force), so 16,384 pages, each allocated,
// cleared and mapped on its own. This program times each way to fill such
// pages, with no pool around it, so that the pool's figure can be read
// against what is possible at all.
//
// Build and run: make bench-growth-floor (prints one line per way, medians).

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace {

constexpr size_t kBytes = size_t{64} << 20;
constexpr int kReps = 9;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// A fresh /dev/shm file of kBytes, mapped; unlinked and unmapped on scope exit.
struct ShmFile {
  int fd = -1;
  unsigned char* p = nullptr;
  std::string name = "/pap-growth-floor-" + std::to_string(::getpid());
  ShmFile() {
    fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ::ftruncate(fd, kBytes) != 0) {
      std::perror("shm_open/ftruncate");
      std::exit(1);
    }
    void* m = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
      std::perror("mmap");
      std::exit(1);
    }
    p = static_cast<unsigned char*>(m);
  }
  ~ShmFile() {
    ::munmap(p, kBytes);
    ::close(fd);
    ::shm_unlink(name.c_str());
  }
  ShmFile(const ShmFile&) = delete;
  ShmFile& operator=(const ShmFile&) = delete;
};

double time_ms(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  std::vector<unsigned char> src(kBytes, 1);
  volatile unsigned char sink = 0;
  // A fresh private anonymous mapping with `advice`, filled by a copy.
  auto anonymous = [&](int advice) {
    return time_ms([&] {
      void* m =
          ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      ::madvise(m, kBytes, advice);
      std::memcpy(m, src.data(), kBytes);
      sink = sink + static_cast<unsigned char*>(m)[12345];
      ::munmap(m, kBytes);
    });
  };
  struct Way {
    const char* name;
    std::function<double()> run;
  };
  const std::vector<Way> ways = {
      {"numpy's way: anonymous, MADV_HUGEPAGE, memcpy", [&] { return anonymous(MADV_HUGEPAGE); }},
      {"anonymous, 4 KiB pages (MADV_NOHUGEPAGE), memcpy",
       [&] { return anonymous(MADV_NOHUGEPAGE); }},
      {"shm: memcpy, a fault per page",
       [&] {
         ShmFile f;
         return time_ms([&] { std::memcpy(f.p, src.data(), kBytes); });
       }},
      {"shm: posix_fallocate + MADV_POPULATE_WRITE + memcpy (the pool's way)",
       [&] {
         ShmFile f;
         return time_ms([&] {
           ::posix_fallocate(f.fd, 0, kBytes);
           ::madvise(f.p, kBytes, MADV_POPULATE_WRITE);
           std::memcpy(f.p, src.data(), kBytes);
         });
       }},
      {"shm: posix_fallocate + pwrite + MADV_POPULATE_READ",
       [&] {
         ShmFile f;
         return time_ms([&] {
           ::posix_fallocate(f.fd, 0, kBytes);
           if (::pwrite(f.fd, src.data(), kBytes, 0) != static_cast<ssize_t>(kBytes)) std::abort();
           ::madvise(f.p, kBytes, MADV_POPULATE_READ);
         });
       }},
      {"shm: pwrite alone (no reservation, no mapping)",
       [&] {
         ShmFile f;
         return time_ms([&] {
           if (::pwrite(f.fd, src.data(), kBytes, 0) != static_cast<ssize_t>(kBytes)) std::abort();
         });
       }},
  };
  std::vector<double> numpy_way;
  for (const Way& w : ways) {
    std::vector<double> t;
    w.run();  // warm-up: the source and the code paths
    for (int i = 0; i < kReps; ++i) t.push_back(w.run());
    if (numpy_way.empty()) numpy_way = t;
    std::printf("%-72s\t%6.1f ms\t%.2fx numpy's way\n", w.name, median(t),
                median(t) / median(numpy_way));
  }
  return sink == 255 ? 1 : 0;
}
