"""Continuous batching with chunked prefill, preemption by recompute and adapter-aware admission.

Each step, under a token budget (``max_num_batched_tokens``):

1. Running sequences first, oldest first: one token each when decoding, the next chunk of the
   prompt when a prefill was cut short. When KV blocks run out, the newest running sequence is
   preempted (its blocks freed, its adapter reference dropped) and re-queued at the front of the
   waiting queue; it recomputes later, usually from the prefix cache.
2. Then waiting sequences, in arrival order, while sequences, tokens and blocks allow. A sequence
   whose adapter cannot be made resident now (the device pool is full of adapters in use or
   pinned) is skipped and later ones may go ahead, so a cold adapter does not stall hot ones.
   **Wait bound**: once the oldest waiting sequence has been skipped ``adapter_wait_bound_steps``
   times, nothing behind it is admitted until it is (the running batch drains, its adapters' rows
   free up, it gets in). So no sequence waits more than that many admission rounds plus the time
   for the running batch to drain.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from loraserve.config import SchedulerConfig
from loraserve.core import Sequence, SeqStatus
from loraserve.kvcache.block_manager import BlockManager, block_hash, seed_hash
from loraserve.lora.store import AdapterStore


@dataclass
class ScheduledSeq:
    """A sequence and how many of its uncomputed tokens run this step."""

    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    """Owns the waiting queue and the running batch; allocates KV blocks and adapter residency."""

    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, store: AdapterStore | None) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.store = store
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """Pick this step's work and reserve its KV blocks and adapters."""
        budget = self.cfg.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = False
        queue = list(self.running)
        i = 0
        while i < len(queue) and budget > 0:
            seq = queue[i]
            if seq.status is not SeqStatus.RUNNING:
                i += 1
                continue
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            need = self.blocks.blocks_needed(seq.num_computed + chunk) - len(seq.block_table)
            while need > self.blocks.num_free:
                # Only sequences not yet scheduled this step may give their blocks up.
                later = [s for s in queue[i + 1 :] if s.status is SeqStatus.RUNNING]
                victim = later[-1] if later else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                seq.block_table.extend(self.blocks.allocate(need))
                out.append(ScheduledSeq(seq, chunk))
                budget -= chunk
            i += 1
        if not preempted:
            budget = self._admit(out, budget)
        return out

    def _admit(self, out: list[ScheduledSeq], budget: int) -> int:
        admitted: list[Sequence] = []
        blocked_head = False
        for pos, seq in enumerate(self.waiting):
            if budget <= 0 or len(self.running) + len(admitted) >= self.cfg.max_num_seqs:
                break
            if blocked_head:
                break
            if seq.adapter is not None and self.store is not None and not self.store.can_make_resident({seq.adapter}):
                seq.waited_steps += 1
                # The oldest waiter past its bound stops everyone behind it (drain), see module doc.
                if pos == 0 and seq.waited_steps > self.cfg.adapter_wait_bound_steps:
                    blocked_head = True
                continue
            seed = seed_hash(seq.adapter_hash)
            hit_ids, hit_hashes = self.blocks.match_prefix(seq.token_ids, seed)
            cached = len(hit_ids) * self.blocks.block_size
            chunk = min(seq.num_tokens - cached, budget)
            need = self.blocks.blocks_needed(cached + chunk) - len(hit_ids)
            if not self.blocks.can_allocate(need, hit_ids):
                break
            self.blocks.take_cached(hit_ids)
            seq.block_table = hit_ids + self.blocks.allocate(need)
            seq.block_hashes = hit_hashes
            seq.num_computed = cached
            if seq.num_output == 0:
                seq.num_cached_prompt = cached
            if seq.adapter is not None and self.store is not None:
                self.store.acquire(seq.adapter)
                seq.holds_adapter = True
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            out.append(ScheduledSeq(seq, chunk))
            budget -= chunk
        for seq in admitted:
            self.waiting.remove(seq)
            self.running.append(seq)
        return budget

    def on_step_done(self, scheduled: Iterable[ScheduledSeq]) -> None:
        """Advance ``num_computed`` and publish newly full blocks to the prefix cache."""
        bs = self.blocks.block_size
        for item in scheduled:
            seq = item.seq
            seq.num_computed += item.num_tokens
            full = min(seq.num_computed // bs, len(seq.block_table))
            parent = seq.block_hashes[-1] if seq.block_hashes else seed_hash(seq.adapter_hash)
            for b in range(len(seq.block_hashes), full):
                parent = block_hash(parent, seq.token_ids[b * bs : (b + 1) * bs])
                self.blocks.register_full(seq.block_table[b], parent)
                seq.block_hashes.append(parent)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks and adapter reference."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        if seq.holds_adapter and seq.adapter is not None and self.store is not None:
            self.store.release(seq.adapter)
            seq.holds_adapter = False
