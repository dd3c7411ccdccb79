"""A byte-bounded LRU of prompt-prefix K/V for the transformers engine.

Scenario prompts share their system turn (preamble + context + instruction, ~290 of ~420 tokens): the 53
scenarios have 9 distinct system turns, and a run asks each of them again and again (every game, every
sample block, exact mode). The engine always computes a prompt in the same two pieces (the system turn, then
the rest), whether the first piece comes from here or is computed afresh, so a cache hit gives bit-identical
results to a miss: resumed runs and reruns do not depend on what the cache held.

Keys are (adapter name or None, prefix token ids): a LoRA adapter changes the K/V, so entries never cross
adapters; the engine empties the cache whenever it loads or unloads an adapter (the model itself changes then).
"""

from __future__ import annotations

from collections import OrderedDict

from tomtransfer.services.teacher.engines.decoding import PromptKV


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = max(0, int(budget_bytes))
        self._items: OrderedDict[tuple, PromptKV] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, adapter: str | None, prefix: list[int]) -> PromptKV | None:
        key = (adapter, tuple(prefix))
        kv = self._items.get(key)
        if kv is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return kv

    def put(self, adapter: str | None, prefix: list[int], kv: PromptKV) -> None:
        size = kv.nbytes
        if size > self.budget:
            return
        key = (adapter, tuple(prefix))
        if key in self._items:
            self.bytes -= self._items.pop(key).nbytes
        while self._items and self.bytes + size > self.budget:
            self.bytes -= self._items.popitem(last=False)[1].nbytes
        self._items[key] = kv
        self.bytes += size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "budget": self.budget, "hits": self.hits,
                "misses": self.misses}
