"""Paged KV cache bookkeeping: a block pool with prefix caching, and per-sequence block tables.

Only the accounting lives here (which block holds which tokens); the tensors themselves belong to
the model runner, laid out as `[num_blocks, block_size, num_kv_heads, head_dim]` per layer (see
`kernels.attention`). The design follows vLLM v1's KV cache manager:

- a full block is identified by a chained SHA-256 of (parent block hash, its token ids, salt, the
  hashes of the media items it holds), so a shared prefix maps to the same physical blocks for every
  sequence that has it, requests with different `cache_salt`s never share a block, and neither do
  equal prompts with different images (their placeholder token ids are equal; the images are not);
- blocks whose reference count drops to zero go to the tail of an LRU free queue but keep their
  hash, so they can still be hit until they are reused for something else (evicted);
- a sequence's blocks are freed tail-first, so the end of a prompt is evicted before its start;
- a sequence may be forked (a beam extended in two ways): the child shares every block of the
  parent's table (reference counts raised, never a copy of the prefix); the partially filled last
  block, which both will write into, is copied on write: the first of them to grow it gets a new
  block and a pending copy of its rows (`take_copies`, run by the model runner before the step).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes
# a media item of a sequence: (first position, end position, content hash) (see `media_in_block`)
MediaSpan = tuple[int, int, bytes]


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], salt: str | None = None, media: bytes = b""
) -> BlockHash:
    """Chained SHA-256 of one full block; equal prefixes (with equal salts) give equal chains.

    Why a cryptographic hash: a hit is trusted without comparing token ids, so a collision would
    hand one request another's keys and values, wrong output and a leak across tenants. Python's
    `hash()` of a tuple is 64 bits and easy to collide on purpose (it is not keyed for ints);
    SHA-256 makes a collision infeasible, at about a microsecond per 16-token block. The salt
    (a request's `cache_salt`) enters the first block and, through the chain, every later one;
    `media` (the hashes of the media items overlapping the block) enters the blocks that hold them.
    """
    digest = hashlib.sha256(parent or b"root")
    if parent is None and salt is not None:
        digest.update(b"salt\x00" + salt.encode("utf-8", "surrogatepass") + b"\x00")
    digest.update(array("q", token_ids).tobytes())
    if media:
        digest.update(b"media\x00" + media)
    return digest.digest()


def media_in_block(media: Sequence[MediaSpan], start: int, end: int) -> bytes:
    """The hashes of the items overlapping positions [start, end), in order (b"" when none)."""
    return b"".join(digest for first, last, digest in media if first < end and last > start)


class BlockPool:
    """Fixed set of physical blocks, reference counted, with a hash -> block map for prefix hits."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (least recently freed first). Insertion order is the LRU order.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, Block] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    def allocate(self, count: int) -> list[Block] | None:
        """Take `count` blocks off the free queue, evicting their cached contents; None if short."""
        if count > len(self._free):
            return None
        out = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, block: Block) -> None:
        """Take a reference on a cached block (a prefix hit)."""
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def release(self, blocks: Sequence[Block]) -> None:
        """Drop one reference on each block; unreferenced ones become free (still hittable)."""
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block

    def cache(self, block: Block, block_hash: BlockHash) -> None:
        """Publish a full block under its hash so later sequences can share it."""
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block)

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()


class SequenceBlocks:
    """The block table of one sequence plus the hash chain of its full blocks."""

    __slots__ = ("blocks", "block_ids", "hashes", "salt", "media", "shared_tail")

    def __init__(self, salt: str | None = None, media: Sequence[MediaSpan] = ()) -> None:
        self.blocks: list[Block] = []
        self.block_ids: list[int] = []  # kept alongside `blocks`: the step builder reads it every step
        self.hashes: list[BlockHash] = []
        self.salt = salt
        self.media = tuple(media)
        self.shared_tail = False  # the last block is partially filled and was shared by a fork

    def append(self, block: Block) -> None:
        self.blocks.append(block)
        self.block_ids.append(block.block_id)


class KVCacheManager:
    """Allocates blocks to sequences, finds prefix hits, and frees blocks the moment a sequence ends."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self._tables: dict[str, SequenceBlocks] = {}
        self._copies: list[tuple[int, int]] = []  # (src, dst) block copies the next step must run first

    def table(self, seq_id: str) -> SequenceBlocks:
        return self._tables[seq_id]

    def block_ids(self, seq_id: str) -> list[int]:
        return self._tables[seq_id].block_ids

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def _block_hash(
        self, parent: BlockHash | None, token_ids: Sequence[int], i: int, table: SequenceBlocks
    ) -> BlockHash:
        """The hash of block `i` of a sequence whose tokens are `token_ids`."""
        bs = self.block_size
        media = media_in_block(table.media, i * bs, (i + 1) * bs) if table.media else b""
        return hash_block(parent, token_ids[i * bs : (i + 1) * bs], table.salt, media)

    def _hash_chain(
        self, token_ids: Sequence[int], num_blocks: int, table: SequenceBlocks
    ) -> list[BlockHash]:
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for i in range(num_blocks):
            parent = self._block_hash(parent, token_ids, i, table)
            hashes.append(parent)
        return hashes

    def start(
        self,
        seq_id: str,
        token_ids: Sequence[int],
        salt: str | None = None,
        read_cache: bool = True,
        media: Sequence[MediaSpan] = (),
    ) -> int:
        """Open a sequence and attach the cached blocks of its longest cached prefix.

        Returns the number of tokens already computed. At least the last token is always left to
        compute, because its logits are needed to sample. `read_cache=False` computes everything
        (a request scoring its prompt needs every position's output); its blocks are still published.
        """
        table = SequenceBlocks(salt, media)
        self._tables[seq_id] = table
        max_blocks = (len(token_ids) - 1) // self.block_size
        if max_blocks <= 0 or not self.pool.enable_prefix_caching or not read_cache:
            return 0
        for block_hash in self._hash_chain(token_ids, max_blocks, table):
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            self.pool.touch(block)
            table.append(block)
            table.hashes.append(block_hash)
        return len(table.blocks) * self.block_size

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so the sequence can hold `num_tokens` tokens in total."""
        have = len(self._tables[seq_id].blocks)
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, seq_id: str, num_tokens: int) -> bool:
        """Grow the sequence's table to hold `num_tokens` tokens; False (and no change) if out of blocks.

        Called before every write, so a last block still shared with a fork is copied here first."""
        table = self._tables[seq_id]
        if table.shared_tail and table.blocks[-1].ref_count == 1:
            table.shared_tail = False  # the others let go of it: write in place
        need = self.blocks_needed(seq_id, num_tokens) + table.shared_tail
        if need == 0:
            return True
        blocks = self.pool.allocate(need)
        if blocks is None:
            return False
        if table.shared_tail:
            self._copy_tail(table, blocks.pop(0))
        for block in blocks:
            table.append(block)
        return True

    def _copy_tail(self, table: SequenceBlocks, block: Block) -> None:
        shared = table.blocks[-1]
        table.blocks[-1] = block
        table.block_ids[-1] = block.block_id
        table.shared_tail = False
        self._copies.append((shared.block_id, block.block_id))
        self.pool.release([shared])

    def fork(self, parent_id: str, child_id: str, num_computed: int) -> None:
        """Open `child_id` with `parent_id`'s blocks for its first `num_computed` tokens, shared.

        Full blocks stay shared for good (they are never written again); a partially filled last
        block is shared until one side grows into it (`allocate` copies it then)."""
        parent = self._tables[parent_id]
        keep = -(-num_computed // self.block_size)
        if keep != len(parent.blocks):
            raise ValueError(f"a fork at {num_computed} tokens needs the parent to hold exactly {keep} blocks")
        child = SequenceBlocks(parent.salt, parent.media)
        for block in parent.blocks[:keep]:
            self.pool.touch(block)
            child.append(block)
        child.hashes = parent.hashes[: min(len(parent.hashes), keep)]
        if num_computed % self.block_size:
            parent.shared_tail = child.shared_tail = True
        self._tables[child_id] = child

    def take_copies(self) -> list[list[tuple[int, int]]]:
        """The pending block copies, in batches in which no destination is also a source (a block
        freed and reused since may be both); run them in order before the next forward pass."""
        batches: list[list[tuple[int, int]]] = []
        sources: set[int] = set()
        destinations: set[int] = set()
        for src, dst in self._copies:
            if not batches or dst in sources or src in destinations:
                batches.append([])
                sources, destinations = set(), set()
            batches[-1].append((src, dst))
            sources.add(src)
            destinations.add(dst)
        self._copies.clear()
        return batches

    def has_uncommitted(self, seq_id: str, num_computed: int) -> bool:
        """Whether `commit(seq_id, ..., num_computed)` would publish a block (cheap; no token ids needed)."""
        table = self._tables[seq_id]
        return min(num_computed // self.block_size, len(table.blocks)) > len(table.hashes)

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Publish every full block among the first `num_computed` tokens, for later prefix hits.

        The scheduler calls this when it allocates a chunk, before the step computes it (as vLLM v1
        does): a sequence scheduled later in the same step may then share those blocks, because each
        layer writes every new key/value of the step before any sequence attends.
        """
        table = self._tables[seq_id]
        full = min(num_computed // self.block_size, len(table.blocks))
        if full <= len(table.hashes):
            return
        parent = table.hashes[-1] if table.hashes else None
        for i in range(len(table.hashes), full):
            parent = self._block_hash(parent, token_ids, i, table)
            table.hashes.append(parent)
            self.pool.cache(table.blocks[i], parent)

    def free(self, seq_id: str) -> None:
        """Release all blocks of a sequence at once (finish, abort, or preemption)."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            if self._copies:  # a copy into a block this sequence no longer holds is not needed
                mine = set(table.block_ids)
                self._copies = [(src, dst) for src, dst in self._copies if dst not in mine]
            self.pool.release(list(reversed(table.blocks)))
