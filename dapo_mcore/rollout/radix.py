"""Radix tree over token ids holding the KV of prompt prefixes: the embedded engine's cross-request
prefix cache (the idea of SGLang's RadixCache, at token granularity).

Each edge is labelled with a run of token ids (``Node.key``); the node at its end holds the KV of
exactly those tokens, computed in the context of the path above it::

    Node.kv: [layers, 2 (key, value), kv_heads, len(key), head_dim], the model's KV dtype

so the KV of a prefix is the concatenation (on dim 3) of the node KVs along its path. A node whose
``kv`` is None is *pending*: created by the running batch (:meth:`RadixCache.insert`) and filled
(:meth:`RadixCache.set_kv`) before that batch decodes. ``refs`` pins the nodes on the paths of the
running batch; :meth:`RadixCache.evict` removes unpinned leaves, least recently used first, until
the stored KV fits ``max_bytes`` (an inner node becomes evictable once its children are gone).

Not thread-safe: the engine calls it under its own lock.
"""
from __future__ import annotations

import heapq

import torch


class Node:
    __slots__ = ("key", "kv", "children", "parent", "refs", "last_use")

    def __init__(self, key: list[int], parent: "Node | None"):
        self.key = key
        self.kv: torch.Tensor | None = None
        self.children: dict[int, Node] = {}
        self.parent = parent
        self.refs = 0
        self.last_use = 0

    def path(self) -> list["Node"]:
        """The nodes from the root's child down to this node (empty for the root)."""
        out = []
        n = self
        while n.parent is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def depth_tokens(self) -> int:
        """Tokens on the path from the root to the end of this node."""
        return sum(len(n.key) for n in self.path())


class RadixCache:
    """Token-prefix -> KV map with a byte bound (see module doc). ``bytes``/``tokens``: KV stored
    now (computed nodes); ``evicted_tokens``: tokens evicted so far."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"radix cache bound must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.root = Node([], None)
        self.bytes = 0
        self.tokens = 0
        self.evicted_tokens = 0
        self._clock = 0
        self._pending: list[Node] = []   # nodes created pending since the last fill/discard

    # -- lookup / insert ------------------------------------------------------------------------
    def insert(self, ids: list[int]) -> tuple[Node, int]:
        """Walk the tree along ``ids``, creating pending nodes for the part not in it (and splitting
        an edge where ``ids`` leaves it), pin every node on the path and mark it used.

        Returns ``(node, new)``: the node ending exactly at ``len(ids)`` (the root for ``[]``) and
        the number of tokens of ``ids`` this call added as pending (0 = all already in the tree,
        computed or pending)."""
        self._clock += 1
        ids = list(ids)
        node, i, new = self.root, 0, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                leaf = Node(list(ids[i:]), node)
                node.children[ids[i]] = leaf
                self._pending.append(leaf)
                new += len(ids) - i
                node, i = leaf, len(ids)
                break
            seg = ids[i:i + len(child.key)]
            k = len(seg)
            if seg != child.key:  # ids leave (or end inside) this edge: split it where they do
                k = 1
                while k < len(seg) and seg[k] == child.key[k]:
                    k += 1
                child = self._split(child, k)
            node, i = child, i + k
        for n in node.path():
            n.refs += 1
            n.last_use = self._clock
        return node, new

    def match_length(self, ids: list[int]) -> int:
        """Length of the longest prefix of ``ids`` whose KV is stored (read-only; for tests/stats)."""
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None or child.kv is None:
                break
            k = 0
            while k < len(child.key) and i + k < len(ids) and child.key[k] == ids[i + k]:
                k += 1
            i += k
            if k < len(child.key):
                break
            node = child
        return i

    def release(self, node: Node) -> None:
        """Unpin the path ending at ``node`` (one :meth:`insert`)."""
        for n in node.path():
            if n.refs <= 0:
                raise RuntimeError("radix cache: release of an unpinned node")
            n.refs -= 1

    def set_kv(self, node: Node, kv: torch.Tensor) -> None:
        """Fill a pending node; ``kv`` [layers, 2, kv_heads, len(node.key), head_dim], contiguous."""
        if node.kv is not None:
            raise RuntimeError("radix cache: node already computed")
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(node.key):
            raise ValueError(f"radix cache: kv of shape {tuple(kv.shape)} for a node of {len(node.key)} tokens")
        node.kv = kv
        self.bytes += kv.nbytes
        self.tokens += len(node.key)

    def pending(self) -> list[Node]:
        """All pending nodes (created by the running batch), parents before children."""
        self._pending = [n for n in self._pending if n.kv is None]
        return sorted(self._pending, key=lambda n: n.depth_tokens())

    # -- memory -----------------------------------------------------------------------------------
    def evict(self, max_bytes: int | None = None) -> int:
        """Remove unpinned computed leaves, least recently used first, until ``bytes <= max_bytes``
        (default: the cache's bound) or nothing is evictable. Returns the tokens evicted."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        if self.bytes <= limit:
            return 0
        heap = [(n.last_use, id(n), n) for n in self._nodes() if self._evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while self.bytes > limit and heap:
            _, _, n = heapq.heappop(heap)
            parent = n.parent
            del parent.children[n.key[0]]
            n.parent = None
            self.bytes -= n.kv.nbytes
            self.tokens -= len(n.key)
            freed += len(n.key)
            if parent is not self.root and self._evictable(parent):
                heapq.heappush(heap, (parent.last_use, id(parent), parent))
        self.evicted_tokens += freed
        return freed

    def discard_pending(self) -> None:
        """Detach every pending node with its subtree (all pending: children are computed after their
        parents), for a batch that failed before filling them. Release the batch's pins first."""
        for n in self._pending:
            if n.kv is None and (n.parent.parent is None or n.parent.kv is not None):
                del n.parent.children[n.key[0]]
        self._pending = []

    def clear(self) -> None:
        self.root = Node([], None)
        self.bytes = self.tokens = 0
        self._pending = []

    def check(self) -> None:
        """Invariants (tests): stored bytes/tokens add up, refs >= 0, children keyed by first token,
        no computed node below a pending one."""
        b = t = 0
        for n in self._nodes():
            if n.refs < 0:
                raise AssertionError("negative refs")
            for tok, c in n.children.items():
                if c.key[0] != tok or c.parent is not n or not c.key:
                    raise AssertionError("bad child link")
                if n.parent is not None and n.kv is None and c.kv is not None:
                    raise AssertionError("computed node below a pending one")
            if n.kv is not None:
                b += n.kv.nbytes
                t += len(n.key)
        in_tree = {id(n) for n in self._nodes() if n.kv is None and n.parent is not None}
        if in_tree != {id(n) for n in self._pending if n.kv is None}:
            raise AssertionError("pending nodes in the tree and the pending list differ")
        if (b, t) != (self.bytes, self.tokens):
            raise AssertionError(f"stored {b} B / {t} tokens, counted {self.bytes} B / {self.tokens} tokens")

    # -- internals ------------------------------------------------------------------------------
    def _split(self, child: Node, k: int) -> Node:
        """Split ``child``'s edge after ``k`` tokens; returns the new upper node (``child`` keeps
        its identity as the lower part, so pointers to it stay valid)."""
        mid = Node(child.key[:k], child.parent)
        mid.refs, mid.last_use = child.refs, child.last_use
        if child.kv is None:
            self._pending.append(mid)
        child.parent.children[child.key[0]] = mid
        child.key = child.key[k:]
        child.parent = mid
        mid.children[child.key[0]] = child
        if child.kv is not None:  # clones, so that evicting one half frees its memory
            kv = child.kv
            mid.kv = kv[:, :, :, :k].contiguous()
            child.kv = kv[:, :, :, k:].contiguous()
        return mid

    def _evictable(self, n: Node) -> bool:
        return n.parent is not None and not n.children and n.refs == 0 and n.kv is not None

    def _nodes(self) -> list[Node]:
        return self._subtree(self.root)

    @staticmethod
    def _subtree(top: Node) -> list[Node]:
        out, stack = [], [top]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out
