// What the pool tests share: fresh tokens (remembered for the final
// /dev/shm check), attachments that leave when a test ends, handles to
// blocks, and random traffic through a pool.

#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/handle.hpp"
#include "core/pool.hpp"

namespace pap::test {

extern std::vector<std::string> g_tokens;  // every pool token this program made

// A fresh random token, remembered in g_tokens.
std::string new_token();

std::vector<std::string> shm_entries(const std::string& token);
bool shm_exists(const std::string& name);  // name as given to shm_open: "/pyarraypool-..."

inline PoolConfig make_config(uint64_t max_bytes, uint64_t segment_bytes,
                              uint64_t timeout_ns = 30'000'000'000ull) {
  return PoolConfig{max_bytes, segment_bytes, timeout_ns};
}

// Leaves the pool when the test ends, also when it fails half-way.
class Attached {
 public:
  Attached(const std::string& token, const PoolConfig& cfg, ProgramRoot root = {})
      : p_(Pool::attach(token, cfg, root)) {}
  ~Attached();
  Attached(const Attached&) = delete;
  Attached& operator=(const Attached&) = delete;
  Pool* operator->() { return p_.get(); }
  Pool& operator*() { return *p_; }

 private:
  std::unique_ptr<Pool> p_;
};

inline Handle decode(const std::string& s) { return decode_handle(s.data(), s.size()); }

Handle handle_of(const Pool& p, const Block& b, uint8_t flags);

// As the binding does: through the bytes, then the extent, then the pool.
std::optional<Block> attach_handle(Pool& p, const Handle& h);

// Random allocate / check / release traffic; returns the number of problems.
int pool_traffic(Pool& p, uint64_t seed, long ops, uint64_t max_bytes);

}  // namespace pap::test
