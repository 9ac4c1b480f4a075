// The pool tests' shared helpers (see pool_helpers.hpp).

#include "pool_helpers.hpp"

#include <unistd.h>

#include <random>

#include "core/errors.hpp"
#include "core/shm_segment.hpp"
#include "harness.hpp"

namespace pap::test {

std::vector<std::string> g_tokens;

std::string new_token() {
  std::string t = random_token();
  g_tokens.push_back(t);
  return t;
}

std::vector<std::string> shm_entries(const std::string& token) {
  return list_segments(std::string(kShmPrefix) + token);
}

bool shm_exists(const std::string& name) {
  return ::access(("/dev/shm" + name).c_str(), F_OK) == 0;
}

Attached::~Attached() {
  if (p_ && !p_->left()) {
    try {
      p_->leave();
    } catch (...) {
    }
  }
}

Handle handle_of(const Pool& p, const Block& b, uint8_t flags) {
  Handle h;
  h.pool = p.id();
  h.instance = p.instance();
  h.ref = b.ref;
  h.generation = b.generation;
  h.flags = flags;
  h.itemsize = 1;
  h.ndim = 1;
  h.shape[0] = static_cast<int64_t>(b.capacity);
  h.strides[0] = 1;
  return h;
}

std::optional<Block> attach_handle(Pool& p, const Handle& h) {
  Handle d = decode(encode_handle(h));
  uint64_t lo, hi;
  if (!view_extent(d, &lo, &hi)) throw CoreError(ErrorKind::kInvalidHandle, "extent");
  return p.attach_block(d, lo, hi, Mode::kSlow);
}

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

}  // namespace pap::test
