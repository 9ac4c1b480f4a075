// The allocator tests' arena (see allocator_arena.hpp).

#include "allocator_arena.hpp"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>

namespace pap::test {

namespace {

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

}  // namespace

Arena::Arena(const std::vector<uint64_t>& sizes, bool shared, size_t extra)
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

Arena::~Arena() {
  if (shared_)
    ::munmap(region_, bytes_);
  else
    std::free(region_);
}

std::unique_ptr<Arena> Arena::clone() const {
  auto c = std::make_unique<Arena>(sizes_, false, bytes_ - extra_at_);
  std::memcpy(c->region_, region_, bytes_);
  return c;
}

void Arena::format() {
  Allocator a = alloc();
  a.reset();
  for (uint32_t i = 0; i < nsegs(); ++i) {
    a.format_segment(i);
    a.add_segment(i);
  }
}

bool Arena::canaries_ok() const {
  for (size_t i = 0; i < spans_.size(); ++i) {
    const unsigned char* p = spans_[i].base + sizes_[i];
    for (uint64_t k = 0; k < round_up(sizes_[i], 64) + 64 - sizes_[i]; ++k)
      if (p[k] != kCanary) return false;
  }
  return true;
}

std::vector<ChainBlock> chain_of(Arena& ar) {
  std::vector<ChainBlock> out;
  Allocator a = ar.alloc();
  for (uint32_t seg = 0; seg < ar.nsegs(); ++seg)
    a.for_each_block(seg, [&](BlockRef r, const BlockHeader& h) {
      out.push_back({r.bits(), h.size(), h.used(), h.used() ? h.generation : 0});
    });
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

bool segment_is_empty(Arena& ar, uint32_t seg) {
  int n = 0;
  bool ok = true;
  ar.alloc().for_each_block(seg, [&](BlockRef r, const BlockHeader& h) {
    ++n;
    ok &= r.off() == 0 && !h.used() && h.size() == ar.usable(seg);
  });
  return n == 1 && ok;
}

}  // namespace pap::test
