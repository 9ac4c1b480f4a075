// A detailed picture of a pool, gathered under its lock: memory by block size
// class, what each attached process holds, and the pickles still pending.
//
// Gathering walks every block (O(blocks)), so it happens only on request
// (Pool::snapshot, the CLI) and on the error path of a full pool, never in
// allocate/release/handle traffic.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/block_header.hpp"
#include "core/pool.hpp"

namespace pap {

// Blocks (headers included) of size [min_size, 2 * min_size).
struct SizeClassStats {
  uint64_t min_size = 0;
  uint64_t used_blocks = 0;
  uint64_t used_bytes = 0;
  uint64_t free_blocks = 0;
  uint64_t free_bytes = 0;
};

// One slot of the process table. A block held by several processes counts
// for each of them.
struct ProcessUsage {
  int pid = 0;
  uint32_t slot = 0;
  // A slot reserved by `pid` for a child it is forking, not adopted yet.
  bool reserved = false;
  uint64_t blocks = 0;
  uint64_t bytes = 0;
};

// A block with pickles made but not loaded yet.
struct PendingTransfer {
  uint64_t block_size = 0;
  uint32_t pickles = 0;
  // Since the newest of its pickles was made (one deadline per block).
  uint64_t age_ns = 0;
  uint64_t expires_in_ns = 0;
  int sender_pid = 0;  // of the newest pickle; 0 if unknown
};

struct PoolSnapshot {
  PoolStats stats;
  std::string instance;
  uint64_t created_realtime_ns = 0;
  std::vector<SizeClassStats> size_classes;  // classes with a block, ascending
  std::vector<ProcessUsage> processes;       // most bytes held first
  std::vector<PendingTransfer> pending;      // oldest first
  uint64_t pending_bytes = 0;                // of the blocks in `pending`
};

// Accumulates blocks and slots into a PoolSnapshot.
class SnapshotBuilder {
 public:
  SnapshotBuilder(uint64_t now_ns, uint64_t transfer_timeout_ns)
      : now_(now_ns), timeout_(transfer_timeout_ns) {}
  void add_block(const BlockHeader& h);
  // A live slot with its id (see process_table.hpp) and what its hold list
  // names; only these appear.
  void add_slot(uint32_t slot, uint64_t id, uint64_t blocks, uint64_t bytes);
  void finish(PoolSnapshot* out) const;

 private:
  static constexpr int kClasses = 64;
  uint64_t now_;
  uint64_t timeout_;
  SizeClassStats classes_[kClasses] = {};
  std::vector<ProcessUsage> processes_;
  std::vector<PendingTransfer> pending_;
};

// "1.5 MiB": binary units, one decimal.
std::string human_bytes(uint64_t n);
// "2.5 s"
std::string human_seconds(uint64_t ns);

// What uses the pool, in one line for error messages: the `top` processes
// holding the most, and the pending pickles with the oldest one's age.
std::string describe_usage(const PoolSnapshot& s, size_t top = 3);

}  // namespace pap
