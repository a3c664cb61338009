"""The curated mutants of ``scripts/mutants.py``: one-line bugs a fast path could plausibly have.

Each entry: ``id``; ``module`` (the report's row); ``file``; ``find`` (an exact snippet that occurs once in the
file) and ``replace``; ``tests`` (the test files that cover that code); and, only for a mutant that changes
nothing observable, ``equivalent``: why.
"""

ENGINE = "src/lmlab/inference/engine.py"
POOL = "src/lmlab/inference/pool.py"
PREFIX = "src/lmlab/inference/prefix_cache.py"
SAMPLING = "src/lmlab/inference/sampling.py"
LOADER, DIALOG, TEXT = "src/lmlab/data/loader.py", "src/lmlab/data/dialog.py", "src/lmlab/data/text.py"
CKPT, TRAINER = "src/lmlab/train/checkpoint.py", "src/lmlab/train/trainer.py"
OPTIM = "src/lmlab/train/optim.py"
SQL = "src/lmlab/tools/sql.py"
TOKENIZERS = "src/lmlab/tokenizers.py"

T_ENGINE = ["tests/test_engine.py"]
T_PREFIX = ["tests/test_prefix_cache.py", "tests/test_engine.py"]
T_SAMPLING = ["tests/test_sampling.py", "tests/test_engine.py"]
T_DATA = ["tests/test_data.py", "tests/test_train.py"]
T_TRAIN = ["tests/test_train.py", "tests/test_faults.py"]
T_SQL = ["tests/test_sql_tool.py"]
T_DIALOG = ["tests/test_tokenizers.py", "tests/test_data.py"]

MUTANTS = [
    # ---- engine ------------------------------------------------------------------------------------------------
    dict(id="engine-cache-last-sampled", module="engine", file=ENGINE,
         find="            self.prefix.insert(s.tokens[:s.n_cached], s.pages)\n        self.pool.decref(s.pages)",
         replace="            self.prefix.insert(s.tokens, s.pages)\n        self.pool.decref(s.pages)",
         tests=T_ENGINE),
    # a sequence waits for another's prefill even when their prompts differ
    dict(id="engine-shares-prefill-any-prompt", module="engine", file=ENGINE,
         find="            if o.n_cached + k >= want and o.tokens[:want] == s.tokens[:want]:",
         replace="            if o.n_cached + k >= want:",
         tests=T_ENGINE),
    # the per-step prefill budget is never spent: one forward may prefill far more than prefill_chunk tokens
    dict(id="engine-prefill-budget-not-spent", module="engine", file=ENGINE,
         find="                prefill.append((s, k))\n                budget -= k\n",
         replace="                prefill.append((s, k))\n",
         tests=T_ENGINE),
    dict(id="engine-max-new-tokens-off-by-one", module="engine", file=ENGINE,
         find="elif s.n_sampled >= s.params.max_new_tokens or",
         replace="elif s.n_sampled > s.params.max_new_tokens or",
         tests=T_ENGINE),
    # the cached suppression mask is keyed by request index, which repeats from one call to the next
    dict(id="engine-suppress-mask-keyed-by-index", module="engine", file=ENGINE,
         find="        key = tuple(s.uid for s in items)",
         replace="        key = tuple(s.index for s in items)",
         tests=T_ENGINE),
    # a decoding sequence whose pages are full takes no new page before its next token
    dict(id="engine-decode-fast-path-past-its-pages", module="engine", file=ENGINE,
         find="if pending == 1 and not s.fresh and s.n_cached < len(s.pages) * ps:",
         replace="if pending == 1 and not s.fresh and s.n_cached <= len(s.pages) * ps:",
         tests=T_ENGINE),
    # a finished sequence's decoded keys never reach the pages that the prefix cache keeps
    dict(id="engine-release-without-flush", module="engine", file=ENGINE,
         find="self._leave_decode(s, flush=self.prefix is not None)",
         replace="self._leave_decode(s, flush=False)",
         tests=T_ENGINE),
    # ---- pool --------------------------------------------------------------------------------------------------
    dict(id="pool-pages-rounded-down", module="pool", file=POOL,
         find="        n_pages = -(-int(n_tokens) // int(page_size))",
         replace="        n_pages = int(n_tokens) // int(page_size)",
         tests=T_ENGINE),
    dict(id="pool-incref-no-increment", module="pool", file=POOL,
         find='                raise RuntimeError(f"PagePool: incref of free page {p}")\n'
              "            self.refcount[p] += 1\n",
         replace='                raise RuntimeError(f"PagePool: incref of free page {p}")\n',
         tests=T_ENGINE),
    dict(id="pool-paged-mask-strict", module="pool", file=POOL,
         find="        mask = (ks == qs[:, :, None]) & (kp <= qp_t[:, :, None])",
         replace="        mask = (ks == qs[:, :, None]) & (kp < qp_t[:, :, None])",
         tests=T_ENGINE),
    dict(id="pool-decode-remove-own-length", module="pool", file=POOL,
         find="            m = self.lengths[last]\n",
         replace="            m = self.lengths[row]\n",
         tests=T_ENGINE),
    # a row that leaves the decode batch does not write what it decoded to its pages
    dict(id="pool-decode-remove-without-flush", module="pool", file=POOL,
         find="        if flush:\n            self.flush(row)\n",
         replace="",
         tests=T_ENGINE),
    dict(id="pool-flush-from-its-length", module="pool", file=POOL,
         find="        a, b = self.flushed[row], self.lengths[row]\n",
         replace="        a, b = self.flushed[row] + 1, self.lengths[row]\n",
         tests=T_ENGINE),
    # ---- prefix_cache ------------------------------------------------------------------------------------------
    dict(id="prefix-insert-no-incref", module="prefix_cache", file=PREFIX,
         find="                self._by_page[page] = child\n                self.pool.incref([page])\n",
         replace="                self._by_page[page] = child\n",
         tests=T_PREFIX),
    # a hit does not refresh a page's recency: LRU degrades to insertion order
    dict(id="prefix-match-no-touch", module="prefix_cache", file=PREFIX,
         find="            child.last_used = now\n            pages.append(child.page)",
         replace="            pages.append(child.page)",
         tests=T_PREFIX),
    # a leaf's heap entry is not checked against its last use: a leaf matched since it was pushed is evicted by
    # its old recency (replaces prefix-evict-most-recent-first, whose full-scan sort is gone)
    dict(id="prefix-evict-stale-recency", module="prefix_cache", file=PREFIX,
         find="if nd.parent is None or stamp != nd.last_used or not self._evictable(nd):",
         replace="if nd.parent is None or not self._evictable(nd):",
         tests=T_PREFIX),
    dict(id="prefix-evict-held-pages", module="prefix_cache", file=PREFIX,
         find="return not nd.children and self.pool.refcount[nd.page] == 1",
         replace="return not nd.children and self.pool.refcount[nd.page] >= 1",
         tests=T_PREFIX),
    # a parent whose last child went is evictable at once, in the same round (pure LRU, not the scan's rounds)
    dict(id="prefix-evict-parent-same-round", module="prefix_cache", file=PREFIX,
         find="                    exposed.append(parent)\n",
         replace="                    self._push(parent)\n",
         tests=T_PREFIX),
    # a page whose sequence lets go never becomes evictable again
    dict(id="prefix-last-holder-ignored", module="prefix_cache", file=PREFIX,
         find="                heapq.heappush(heap, (nd.last_used, next(seq), nd))\n",
         replace="                pass\n",
         tests=T_PREFIX),
    # an insert that touches a cached, evictable leaf leaves its old recency in the heap
    dict(id="prefix-insert-no-requeue", module="prefix_cache", file=PREFIX,
         find="        if node is not self.root and self._evictable(node):",
         replace="        if False:",
         tests=T_PREFIX),
    # an evicted node stays in the page map: a later holder of that page revives a node no longer in the tree
    dict(id="prefix-evict-keeps-page-map", module="prefix_cache", file=PREFIX,
         find="                del self._by_page[nd.page]\n",
         replace="",
         tests=T_PREFIX),
    # ---- sampling ----------------------------------------------------------------------------------------------
    dict(id="sampling-top-p-strict", module="sampling", file=SAMPLING,
         find="probs.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1.0), 0.0)",
         replace="probs.masked_fill((before > top_p[:, None]) & (top_p[:, None] < 1.0), 0.0)",
         tests=T_SAMPLING),
    dict(id="sampling-top-k-keeps-one-more", module="sampling", file=SAMPLING,
         find="    beyond_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])",
         replace="    beyond_k = (top_k[:, None] > 0) & (rank > top_k[:, None])",
         tests=T_SAMPLING),
    dict(id="sampling-same-seed-every-row", module="sampling", file=SAMPLING,
         find="        rows = [dataclasses.replace(params, seed=base + i) for i in range(n)]",
         replace="        rows = [dataclasses.replace(params, seed=base) for i in range(n)]",
         tests=T_SAMPLING),
    # ---- loader ------------------------------------------------------------------------------------------------
    dict(id="loader-drop-saved-epoch", module="loader", file=LOADER,
         find="        self._epoch, self._index = epoch, index\n",
         replace="        self._epoch, self._index = 0, index\n",
         tests=T_DATA),
    dict(id="loader-targets-cross-documents", module="loader", file=DIALOG,
         find='np.where(same_doc & msk[:, 1:], tok[:, 1:], IGNORE)',
         replace='np.where(msk[:, 1:], tok[:, 1:], IGNORE)',
         tests=T_DATA),
    dict(id="loader-pack-capacity-seq-len", module="loader", file=DIALOG,
         find="                bounds = pack_greedy(self.corpus.lengths[order], self.seq_len + 1)",
         replace="                bounds = pack_greedy(self.corpus.lengths[order], self.seq_len)",
         tests=T_DATA),
    dict(id="loader-padded-width-rounding", module="loader", file=DIALOG,
         find="        return min(self.seq_len, max(8, -(-(longest - 1) // 8) * 8))",
         replace="        return min(self.seq_len, max(8, -(-longest // 8) * 8))",
         tests=T_DATA),
    dict(id="loader-val-drops-partial-row", module="loader", file=TEXT,
         find="        self.num_rows = -(-(self.length - 1) // self.seq_len)",
         replace="        self.num_rows = (self.length - 1) // self.seq_len",
         tests=T_DATA),
    # ---- checkpoint --------------------------------------------------------------------------------------------
    dict(id="checkpoint-no-rng-restore", module="checkpoint", file=TRAINER,
         find='        set_rng_state(state["rng"])\n',
         replace="",
         tests=T_TRAIN),
    dict(id="checkpoint-no-data-position", module="checkpoint", file=TRAINER,
         find='            self.train_loader.load_state_dict(state["data"])\n',
         replace="            pass\n",
         tests=T_TRAIN),
    dict(id="checkpoint-tokens-seen-reset", module="checkpoint", file=TRAINER,
         find='self.step, self.tokens_seen = int(loaded.meta["step"]), int(loaded.meta.get("tokens_seen", 0))',
         replace='self.step, self.tokens_seen = int(loaded.meta["step"]), 0',
         tests=T_TRAIN),
    dict(id="checkpoint-prune-keeps-one-less", module="checkpoint", file=CKPT,
         find="        for old in done[: max(0, len(done) - self.keep_last)]:",
         replace="        for old in done[: max(0, len(done) - self.keep_last + 1)]:",
         tests=T_TRAIN),
    # ---- schedules ---------------------------------------------------------------------------------------------
    dict(id="schedule-cosine-to-linear", module="schedules", file=OPTIM,
         find="return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))",
         replace="return floor + (1.0 - floor) * (1.0 - progress)",
         tests=["tests/test_train.py"]),
    dict(id="schedule-warmup-starts-at-zero", module="schedules", file=OPTIM,
         find="        return (step + 1) / cfg.warmup_steps",
         replace="        return step / cfg.warmup_steps",
         tests=["tests/test_train.py"]),
    dict(id="schedule-cosine-span-off-by-one", module="schedules", file=OPTIM,
         find="        span = max(1, total_steps - cfg.warmup_steps - 1)",
         replace="        span = max(1, total_steps - cfg.warmup_steps)",
         tests=["tests/test_train.py"]),
    dict(id="schedule-wsd-decay-starts-late", module="schedules", file=OPTIM,
         find="        if step < decay_start:",
         replace="        if step <= decay_start:",
         tests=["tests/test_train.py"]),
    # the early-stop cooldown restarts its decay from the schedule's current value instead of the plateau's
    dict(id="schedule-cooldown-from-current", module="schedules", file=TRAINER,
         find="        return lr_at(start, cfg.optim, cfg.train.steps) * max(left, 0.0)",
         replace="        return lr_at(self.step, cfg.optim, cfg.train.steps) * max(left, 0.0)",
         tests=["tests/test_train.py"]),
    # the sparse output head keeps every position's hidden state but the targets of the kept ones only
    dict(id="trainer-sparse-logits-wrong-rows", module="sparse_logits", file="src/lmlab/models/transformer.py",
         find="            h = h[logits_at]",
         replace="            h = h.flatten(0, 1)[: int(logits_at.sum())]",
         tests=["tests/test_train.py"]),
    # length grouping sorts the windows but leaves the batches in length order (the step would follow the length)
    dict(id="loader-grouping-not-shuffled", module="loader", file=DIALOG,
         find="    blocks = out[: n_full * batch].reshape(n_full, batch)[rng.permutation(n_full)]",
         replace="    blocks = out[: n_full * batch].reshape(n_full, batch)",
         tests=T_DATA),
    # length grouping loses a batch of dialogs (no longer a permutation of the epoch)
    dict(id="loader-grouping-drops-a-batch", module="loader", file=DIALOG,
         find="    return np.concatenate([blocks.reshape(-1), out[n_full * batch :]])",
         replace="    return np.concatenate([blocks.reshape(-1)[batch:], out[n_full * batch :]])",
         tests=T_DATA),
    # ---- sql_tool (security gates) -----------------------------------------------------------------------------
    # validation checks the catalog but forgets the schema: main.x / temp.x pass the first gate
    dict(id="sql-schema-qualified-table-passes", module="sql_tool", file=SQL,
         find='        if t.args.get("db") or t.args.get("catalog"):\n'
              '            raise SqlError(f"schema-qualified table',
         replace='        if t.args.get("catalog"):\n            raise SqlError(f"schema-qualified table',
         tests=T_SQL),
    # a qualified column (p.salary) of an allowed table is not checked against the allowed columns
    dict(id="sql-qualified-column-unchecked", module="sql_tool", file=SQL,
         find="                    if name.lower() not in self._tables[scope[q]][1]:\n"
              "                        raise self._unknown_column(name, [scope[q]])\n",
         replace="",
         tests=T_SQL),
    # an allowlist turned into a denylist: any unknown function passes validation
    dict(id="sql-anonymous-function-denylist", module="sql_tool", file=SQL,
         find="            if f.name.lower() not in _ANONYMOUS_FUNCS:",
         replace='            if f.name.lower() in ("load_extension",):',
         tests=T_SQL),
    dict(id="sql-only-first-statement-checked", module="sql_tool", file=SQL,
         find='        if len(statements) > 1:\n            raise SqlError(f"more than 1 statement',
         replace='        if False:\n            raise SqlError(f"more than 1 statement',
         tests=T_SQL),
    # the authorizer lets any column of an allowed table be read
    dict(id="sql-authorizer-any-column", module="sql_tool", file=SQL,
         find=' and (arg2 == "" or (db and arg2.lower() in entry[1])):',
         replace=":",
         tests=T_SQL),
    # the authorizer lets any function run
    dict(id="sql-authorizer-any-function", module="sql_tool", file=SQL,
         find="        if action == sqlite3.SQLITE_FUNCTION and arg2 and arg2.lower() in _SQLITE_FUNCS:",
         replace="        if action == sqlite3.SQLITE_FUNCTION:",
         tests=T_SQL),
    # ---- dialog_masks ------------------------------------------------------------------------------------------
    # the assistant's own begin token (part of the prompt) is trained on
    dict(id="dialog-mask-assistant-begin-token", module="dialog_masks", file=TOKENIZERS,
         find="            mask.append(int(prev_assistant))\n            ids = encode(content)",
         replace='            mask.append(int(source == "assistant"))\n            ids = encode(content)',
         tests=T_DIALOG),
    # a turn's content gets the previous turn's mask (shifted by one turn)
    dict(id="dialog-mask-content-previous-turn", module="dialog_masks", file=TOKENIZERS,
         find="            mask.extend([int(is_assistant)] * len(ids))",
         replace="            mask.extend([int(prev_assistant)] * len(ids))",
         tests=T_DIALOG),
    # <|end_of_dialog|> is always trained on, even after a user turn
    dict(id="dialog-mask-end-always", module="dialog_masks", file=TOKENIZERS,
         find="        tokens.append(self._end)\n        mask.append(int(prev_assistant))",
         replace="        tokens.append(self._end)\n        mask.append(1)",
         tests=T_DIALOG),
    # ---- smear (lmlab.models.smear and the caches' raw keys) ------------------------------------------------------
    dict(id="smear-predecessor-off-by-one", module="smear", file="src/lmlab/models/smear.py",
         find="        out[:, :, back:, back - 1] = k[:, :, :-back]",
         replace="        out[:, :, back:, back - 1] = k[:, :, 1:t - back + 1]",
         tests=["tests/test_model.py"]),
    dict(id="smear-gather-mask-strict", module="smear", file="src/lmlab/models/smear.py",
         find="    return prev * (pos[:, None, :, None] >= back).unsqueeze(-1).to(ctx.dtype)",
         replace="    return prev * (pos[:, None, :, None] > back).unsqueeze(-1).to(ctx.dtype)",
         tests=["tests/test_model.py", "tests/test_engine.py"]),
    dict(id="smear-paged-own-position-as-index", module="smear", file="src/lmlab/inference/pool.py",
         find="        return gather_previous(ctx.transpose(1, 2).to(k.dtype), self.query_key_index, "
              "self.positions, n)",
         replace="        return gather_previous(ctx.transpose(1, 2).to(k.dtype), self.positions, self.positions, n)",
         tests=["tests/test_engine.py"]),
    dict(id="smear-decode-raw-key-not-kept", module="smear", file="src/lmlab/inference/pool.py",
         find="        bkr.view(-1, d).index_copy_(0, self._slot, k.reshape(b * h, d).to(bkr.dtype))\n",
         replace="",
         tests=["tests/test_engine.py"]),
    # ---- distributed (2-process gloo runs against the one-process run) --------------------------------------------
    dict(id="dist-loss-not-scaled-by-dp", module="distributed", file=TRAINER,
         find="        scale = par.dp_size / max(n_targets, 1)\n",
         replace="        scale = 1.0 / max(n_targets, 1)\n",
         tests=["tests/test_distributed.py::test_parallel_training_matches_one_process"]),
    dict(id="dist-recall-gathered-out-of-order", module="distributed", file="src/lmlab/comm.py",
         find="        out[r::world] = part\n",
         replace="        out[r * len(parts[0]):r * len(parts[0]) + len(part)] = part\n",
         tests=["tests/test_distributed.py::test_recall_evaluation_is_split_across_processes_and_equals_one_process"]),
    dict(id="dist-reshard-restarts-the-epoch", module="distributed", file=LOADER,
         find='    return {"format": STATE_FORMAT, "epoch": epoch, "index": index, "source": mine}\n',
         replace='    return {"format": STATE_FORMAT, "epoch": epoch, "index": 0, "source": mine}\n',
         tests=["tests/test_distributed.py::test_checkpoint_reshards_across_world_sizes"]),
    # ---- GRPO (lmlab.train.grpo) ------------------------------------------------------------------------------------
    dict(id="grpo-inserted-tokens-trained", module="grpo", file="src/lmlab/inference/engine.py",
         find="            if added[:max(room, 0)]:\n                s.inserted.append(",
         replace="            if False:\n                s.inserted.append(",
         tests=["tests/test_grpo.py"]),
    dict(id="grpo-advantages-not-centred", module="grpo", file="src/lmlab/train/grpo.py",
         find="    centred = rewards - rewards.mean(dim=1, keepdim=True)\n",
         replace="    centred = rewards - rewards.mean()\n",
         tests=["tests/test_grpo.py"]),
    dict(id="grpo-clip-takes-the-larger-term", module="grpo", file="src/lmlab/train/grpo.py",
         find="    loss = -torch.minimum(unclipped, clipped)\n",
         replace="    loss = -torch.maximum(unclipped, clipped)\n",
         tests=["tests/test_grpo.py"]),
    dict(id="grpo-mask-off-by-one", module="grpo", file="src/lmlab/train/grpo.py",
         find="            start = len(r.prompt) - 1  # target j",
         replace="            start = len(r.prompt)  # target j",
         tests=["tests/test_grpo.py"]),
    dict(id="grpo-logprobs-without-temperature", module="grpo", file="src/lmlab/train/grpo.py",
         find="            return token_logprobs(model, *rows, temperature=self.cfg.rl.temperature)\n",
         replace="            return token_logprobs(model, *rows)\n",
         tests=["tests/test_grpo.py"]),
    dict(id="grpo-sequence-norm-ignores-length", module="grpo", file="src/lmlab/train/grpo.py",
         find="                            weight = 1.0 / (per.float() * max(n_seqs, 1.0))\n",
         replace="                            weight = torch.full_like(loss_tok, 1.0 / max(n_seqs, 1.0))\n",
         tests=["tests/test_grpo.py"]),
    dict(id="grpo-seed-ignores-the-step", module="grpo", file="src/lmlab/train/grpo.py",
         find='    digest = hashlib.blake2b(f"{seed}/{step}/{question}/{sample}".encode(), digest_size=8).digest()\n',
         replace='    digest = hashlib.blake2b(f"{seed}/{question}/{sample}".encode(), digest_size=8).digest()\n',
         tests=["tests/test_grpo.py"]),
    # ---- optional recurrent kernels (lmlab.models.recurrent: kernel_scan, kernel_conv) ------------------------------
    # a document reset does not cut the recurrence on the kernel path
    dict(id="kernels-scan-ignores-resets", module="rec-kernels", file="src/lmlab/models/recurrent.py",
         find="    if resets is not None:\n        g = g.masked_fill(",
         replace="    if False:\n        g = g.masked_fill(",
         tests=["tests/test_recurrent_kernels.py"]),
    # the conv state after the kernel keeps inputs from before the last document's start
    dict(id="kernels-conv-state-crosses-reset", module="rec-kernels", file="src/lmlab/models/recurrent.py",
         find="    tail = None if resets is None else resets[:, -(w - 1):]",
         replace="    tail = None",
         tests=["tests/test_recurrent_kernels.py"]),
    # the conv kernel is not told the documents: inputs of one document reach the next one's first outputs
    dict(id="kernels-conv-no-seq-idx", module="rec-kernels", file="src/lmlab/models/recurrent.py",
         find="    seq_idx = None if resets is None else torch.cumsum(resets, dim=1, dtype=torch.int32)",
         replace="    seq_idx = None",
         tests=["tests/test_recurrent_kernels.py"]),
    # ---- Mamba2 checkpoints in the layout before the by-heads one (Mamba2.from_old_layout, checkpoint.py) ---------
    dict(id="old-layout-z-x-swapped", module="old-layout", file="src/lmlab/models/mamba2.py",
         find="        head = torch.cat([z.unflatten(0, (h, p)), x.unflatten(0, (h, p)),",
         replace="        head = torch.cat([x.unflatten(0, (h, p)), z.unflatten(0, (h, p)),",
         tests=["tests/test_mamba2_old_layout.py"]),
    # the optimizer's moments of the re-laid-out parameters are left at the fresh optimizer's
    dict(id="old-layout-moments-dropped", module="old-layout", file="src/lmlab/train/checkpoint.py",
         find="            if all(torch.is_tensor(v) and v.shape == weights[o].shape for o, v in vals.items()):\n"
              "                new = m.from_old_layout(vals)",
         replace="            if all(torch.is_tensor(v) and v.shape == weights[o].shape for o, v in vals.items()):\n"
                 "                continue",
         tests=["tests/test_mamba2_old_layout.py"]),
]
