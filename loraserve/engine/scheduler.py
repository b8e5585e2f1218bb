"""Continuous batching with chunked prefill, preemption by recompute and adapter-aware admission.

Each step, under a token budget (``max_num_batched_tokens``):

1. Running sequences first, oldest first: one token each when decoding, the next chunk of the
   prompt when a prefill was cut short. When KV blocks run out, the newest running sequence is
   preempted (its blocks freed, its adapter reference dropped) and re-queued at the front of the
   waiting queue; it recomputes later, usually from the prefix cache.
2. Then waiting sequences, while sequences, tokens and blocks allow, scanning at most
   ``lookahead`` of them (the *window*) in *admission order*. Without ``adapter_affinity`` that is
   queue order (arrival order, preempted ones first). With it (the default) the window is
   regrouped: first the sequences already overtaken B times (below), in queue order; then those
   whose adapter (or the base model) is already in the running batch, in queue order; then the
   rest by adapter, each adapter's sequences together, adapters in order of their first sequence
   in the queue. A decode step reads every adapter its batch uses, so admitting one adapter's
   requests together cuts the distinct adapters (and adapter bytes) per step without ever
   reordering past the bound.

Adapter policy (the store does the moves, see ``loraserve.lora.store``):

* **Admit only when ready.** A sequence is admitted only when its adapter is on the device (rows
  allocated and written, or being written by a side-stream copy that the step's forward waits
  for). If its adapter is in host memory the scheduler starts the device load right away (the
  same step on CPU and CUDA); if it is on disk, the store's reader threads fetch it and the
  sequence is simply skipped until then. So a cold adapter never stalls a step, and sequences of
  resident adapters behind it go ahead: batches take as many distinct adapters as rows allow.
* **Prefetch in queue order.** After admission the scheduler hands the store the distinct
  adapters of the first ``lookahead`` waiting sequences in queue order; the store reads them from
  disk in that order (a bounded number in flight) and copies host-resident ones onto free device
  rows ahead of need.
* **No thrashing.** Eviction takes only unpinned adapters that no running sequence uses, and
  among them the one whose next use in the queue is furthest (not queued at all first; then
  least recently used); it never evicts an adapter needed sooner than the one being loaded.

**Bound.** Let B = ``adapter_wait_bound_steps``. A waiting sequence is *overtaken* in an admission
round when it is not admitted while a sequence queued behind it is, unless its adapter is still
being read from disk (point (c)); its ``waited_steps`` counts those rounds. That covers both being
skipped for lack of device rows and being passed by the affinity regrouping.

(a) No sequence is overtaken in more than B rounds: once overtaken B times it is tried before
    every sequence that has not been, so only a sequence queued before it can still go first;
    if it is not ready then (its adapter in host memory, rows lacking), the first such sequence
    in the queue takes the *reservation*, and while it holds it nothing else is admitted (the
    device load is attempted for it alone).
(b) The reservation holder is admitted at the latest D steps after the step that gave it the
    reservation, where D is the largest number of steps (that one included) any sequence running
    in it still needs: its unprefilled prompt chunks plus the tokens it may still generate, at
    most ``max_tokens``. Nothing new starts, so by then every unpinned adapter is unused and
    evictable, the KV cache and the batch seats are free, and pins always leave
    ``max_lora_rank`` rows (enforced by the store); its host copy is safe, being the most urgent.
    This assumes every running sequence is scheduled each step (``max_num_batched_tokens >=
    max_num_seqs``) and its adapter is in host memory (true when it takes the reservation).
(c) Disk reads are issued in queue order, so a sequence's adapter reaches host memory after the
    reads of the adapters queued before it (within ``lookahead``) have been issued; that part is
    I/O time, not a scheduling decision, and does not count toward B.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice

from loraserve.config import SchedulerConfig
from loraserve.core import SeqStatus, Sequence
from loraserve.kvcache.block_manager import BlockManager, block_hash, seed_hash
from loraserve.lora.store import NOT_NEEDED, AdapterEntry, AdapterStore

# How long an idle step (nothing runnable, reads in flight) blocks for a read instead of spinning.
IDLE_WAIT_S = 0.05


@dataclass(slots=True)
class ScheduledSeq:
    """A sequence and how many of its uncomputed tokens run this step.

    ``samples``: the chunk reaches the sequence's last token, so a new token is sampled. The
    scheduler decides it with the chunk, before :meth:`Scheduler.on_step_done` advances the sequence.
    """

    seq: Sequence
    num_tokens: int
    samples: bool


class Scheduler:
    """Owns the waiting queue and the running batch; allocates KV blocks and adapter residency."""

    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, store: AdapterStore | None) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.store = store
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # The sequence holding the admission reservation (see the module docstring, bound (a)).
        self.reserved: Sequence | None = None
        self.num_reservations = 0
        # Waiting sequences looked at per step: bounds the per-step cost with thousands queued.
        self.lookahead = max(256, 4 * cfg.max_num_seqs)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """Pick this step's work and reserve its KV blocks and adapters.

        Raises the load error (an AdapterError) of a queued sequence's adapter whose read failed,
        before anything is scheduled, so that only that adapter's requests are implicated.
        """
        store = self.store
        if store is not None:
            store.poll()
            if self.reserved is not None and self.reserved.status is not SeqStatus.WAITING:
                self.reserved = None
            exc = store.take_error(s.adapter for s in self.waiting if s.adapter is not None)
            if exc is not None:
                raise exc
        budget = self.cfg.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = False
        blocks = self.blocks
        bs = blocks.block_size
        queue = list(self.running)
        # Preemption victims come from the end of the queue: ``tail`` is the last sequence that may
        # still be running. Sequences only stop running in this loop, so it only moves down.
        tail = len(queue) - 1
        for i, seq in enumerate(queue):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue
            computed = seq.num_computed
            remaining = len(seq.token_ids) - computed
            chunk = remaining if remaining < budget else budget
            need = -(-(computed + chunk) // bs) - len(seq.block_table)
            if need > 0:
                while need > blocks.num_free:
                    # Only sequences not yet scheduled this step may give their blocks up.
                    while tail > i and queue[tail].status is not SeqStatus.RUNNING:
                        tail -= 1
                    victim = queue[tail] if tail > i else seq
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue
                seq.block_table.extend(blocks.allocate(need))
            out.append(ScheduledSeq(seq, chunk, chunk == remaining))
            budget -= chunk
        priority = self._set_demand()
        if not preempted:
            budget = self._admit(out, budget, priority)
            if not out and store is not None and self.waiting and store.num_loading:
                # Nothing can run until a read lands: wait for one rather than spin through empty steps.
                store.wait_for_progress(IDLE_WAIT_S)
                budget = self._admit(out, budget, priority)
        if store is not None:
            store.prefetch(device_upto=0 if self.reserved is not None else NOT_NEEDED)
            store.prepare_step(item.seq.adapter for item in out if item.seq.adapter is not None)
        return out

    def _set_demand(self) -> dict[AdapterEntry, int]:
        """Tell the store which adapters the queue needs, in order (the reservation holder's first)."""
        if self.store is None:
            return {}
        first = [self.reserved.adapter] if self.reserved is not None else []
        # Distinct adapters in order of first need (dict.fromkeys keeps the first occurrence).
        needed = dict.fromkeys(chain(first, (seq.adapter for seq in islice(self.waiting, self.lookahead))))
        order = {adapter: pos for pos, adapter in enumerate(a for a in needed if a is not None)}
        self.store.set_demand(order)
        return order

    def _admit(self, out: list[ScheduledSeq], budget: int, priority: dict[AdapterEntry, int]) -> int:
        if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
            return budget  # no room: the loop below would stop before its first sequence
        store = self.store
        holder = self.reserved
        window = [holder] if holder is not None else list(islice(self.waiting, self.lookahead))
        admitted: list[Sequence] = []
        last = -1  # the window position of the last sequence admitted
        tried: set[AdapterEntry] = set()
        for pos, seq in self._admission_order(window):
            if budget <= 0 or len(self.running) + len(admitted) >= self.cfg.max_num_seqs:
                break
            adapter = seq.adapter
            if adapter is not None and store is not None and not store.is_ready(adapter):
                if adapter not in tried:
                    tried.add(adapter)
                    store.make_resident(adapter, priority.get(adapter, NOT_NEEDED))
                if not store.is_ready(adapter):
                    if (
                        adapter in store.host
                        and holder is None
                        and seq.waited_steps >= self.cfg.adapter_wait_bound_steps
                    ):
                        # Bound (a): nothing behind it goes first from now on.
                        self.reserved = seq
                        self.num_reservations += 1
                        break
                    continue
            seed = seed_hash(seq.adapter_hash)
            hit_ids, hit_hashes = self.blocks.match_prefix(seq.token_ids, seed)
            cached = len(hit_ids) * self.blocks.block_size
            remaining = seq.num_tokens - cached
            chunk = min(remaining, budget)
            need = self.blocks.blocks_needed(cached + chunk) - len(hit_ids)
            if not self.blocks.can_allocate(need, hit_ids):
                break
            self.blocks.take_cached(hit_ids)
            seq.block_table = hit_ids + self.blocks.allocate(need)
            seq.block_hashes = hit_hashes
            seq.num_computed = cached
            if seq.num_output == 0:
                seq.num_cached_prompt = cached
            if adapter is not None and store is not None:
                store.acquire(adapter)
                seq.holds_adapter = True
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            last = max(last, pos)
            out.append(ScheduledSeq(seq, chunk, chunk == remaining))
            budget -= chunk
        if admitted:
            self._count_overtaken(window[:last], admitted)
        if holder is not None and holder in admitted:
            self.reserved = None
        for seq in admitted:
            self.waiting.remove(seq)
            self.running.append(seq)
        return budget

    def _admission_order(self, window: list[Sequence]) -> Iterator[tuple[int, Sequence]]:
        """The window in the order admission tries it (the module docstring, point 2), with each
        sequence's position in the window.

        Lazy, since admission usually stops after a few sequences: only the scan for sequences
        overtaken B times covers the whole window up front. Nothing it reads (``waited_steps``, the
        running batch's adapters) changes before admission ends.
        """
        if not self.cfg.adapter_affinity:
            yield from enumerate(window)
            return
        bound = self.cfg.adapter_wait_bound_steps
        yield from [(pos, seq) for pos, seq in enumerate(window) if seq.waited_steps >= bound]
        active = {s.adapter for s in self.running}
        groups: dict[AdapterEntry | None, list[tuple[int, Sequence]]] = {}
        for pos, seq in enumerate(window):
            if seq.waited_steps >= bound:
                continue
            if seq.adapter in active:
                yield pos, seq
            else:
                groups.setdefault(seq.adapter, []).append((pos, seq))
        for group in groups.values():
            yield from group

    def _count_overtaken(self, passed: list[Sequence], admitted: list[Sequence]) -> None:
        """Count a round for each sequence of ``passed`` (the window up to the last sequence
        admitted) that was not admitted: one queued behind it was (bound (a))."""
        done = set(admitted)
        store = self.store
        for seq in passed:
            if seq in done or seq is self.reserved:
                continue
            adapter = seq.adapter
            if (
                adapter is not None
                and store is not None
                and not store.is_ready(adapter)
                and adapter not in store.host
            ):
                continue  # waiting for its disk read: I/O, not a scheduling decision (point (c))
            seq.waited_steps += 1

    def on_step_done(self, scheduled: Iterable[ScheduledSeq]) -> None:
        """Advance ``num_computed`` and publish newly full blocks to the prefix cache."""
        blocks = self.blocks
        bs = blocks.block_size
        for item in scheduled:
            seq = item.seq
            computed = seq.num_computed + item.num_tokens
            seq.num_computed = computed
            hashes = seq.block_hashes
            full = computed // bs
            if full <= len(hashes):
                continue  # no block became full (most decode steps)
            full = min(full, len(seq.block_table))
            parent = hashes[-1] if hashes else seed_hash(seq.adapter_hash)
            tokens = seq.token_ids
            for b in range(len(hashes), full):
                parent = block_hash(parent, tokens[b * bs : (b + 1) * bs])
                blocks.register_full(seq.block_table[b], parent)
                hashes.append(parent)

    def finish(self, seq: Sequence) -> None:
        """Free a finished or aborted sequence's blocks and adapter reference."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq is self.reserved:
            self.reserved = None
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.waited_steps = 0  # a fresh wait: the bound counts from its re-queueing
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        if seq.holds_adapter and seq.adapter is not None and self.store is not None:
            self.store.release(seq.adapter)
            seq.holds_adapter = False
