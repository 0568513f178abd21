"""Every default of a run lives here; experiment configs start from this and override.

    python train.py                                   # trains exactly this config
    python train.py --config=configs/base.py --workdir=runs/base --config.train.steps=100

The default is a small decoder-only byte-level Transformer (pre-norm RMSNorm, RoPE, SwiGLU) trained on the
bundled corpus (the Python standard library's source text). On 2 Sapphire Rapids cores (AMX: bf16
matmuls) it finishes in about 9.5 minutes and ends at 1.53 bits per byte on the whole valid split, below xz
-9e's 1.60 on the same bytes; the sizes were chosen by measurement (README "Results").
"""

import ml_collections

# Logical axis name -> mesh axis (or None = replicated). MaxText/T5X style, kept short on purpose.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    # The residual stream's embed dim stays unsharded (Megatron layout). Mapping it to "tensor" makes XLA's
    # SPMD partitioner miscompile `x + x @ w` for w [mlp/heads -> tensor, embed -> fsdp] on a mesh with
    # data, fsdp and tensor all > 1 (wrong values, no error; jax 0.12, Shardy and GSPMD alike), which broke
    # losses on a 2x2x2 mesh. tests/training/test_sharding.py guards this.
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("relative_buckets", None),  # T5 relative-position bias tables [heads, buckets]
)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1900  # optimizer steps (about 7.8M training bytes)
  config.train.batch_size = 16  # global batch, in sequences
  config.train.seq_len = 256  # bytes per training sequence (model input length)
  config.train.grad_accum = 1  # micro-batches per optimizer step (batch_size must divide evenly)
  config.train.log_every = 20
  config.train.eval_every = 950  # 0 disables periodic eval; a final eval always runs
  config.train.seed = 0
  # Matmul dtype (params, logits, loss and softmax stay f32). "auto" = bfloat16 on accelerators and on CPUs
  # with AMX, where it is faster, else float32 (runtime.auto_compute_dtype); config.json records the choice.
  config.train.compute_dtype = "auto"
  config.train.progress_bar = True  # on a terminal only; logs plain lines otherwise
  # (first, last): write a jax.profiler trace of those steps to <workdir>/profile (TensorBoard's profile
  # plugin or Perfetto open it); () = no trace. E.g. --config.train.profile_steps=10,12
  config.train.profile_steps = ()
  # A run directory whose latest checkpoint initialises every parameter it has (same name and shape) at
  # step 0, e.g. MrT5 from a trained ByT5 (only the gate is new); "" = random init.
  config.train.init_from = ""
  # XLA's persistent compilation cache: a resumed, repeated or evaluated run loads what an earlier process
  # compiled (a tiny MrT5 run on 2 cores: 73 s -> 17 s). "" = $JAX_COMPILATION_CACHE_DIR, else
  # ~/.cache/bytelab/jax; "off" disables it.
  config.train.compilation_cache_dir = ""

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 3e-3  # peak learning rate
  config.optimizer.warmup_steps = 50
  config.optimizer.schedule = "cosine"  # after the warmup: cosine | linear decay
  config.optimizer.min_lr_ratio = 0.1  # the decay ends at lr * min_lr_ratio at train.steps
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1  # decoupled; not applied to norms, biases and embeddings
  config.optimizer.grad_clip = 1.0  # global-norm clip; 0 disables

  config.model = ml_collections.ConfigDict()
  config.model.name = "transformer"  # model family (models/family.py): transformer | landmark_lm | byt5
  # Token mixer: a name, or a list with one name per layer (e.g. Cog keeps softmax in the first/last layer).
  # Typed `object` so configs and --config.model.mixer overrides may replace the name by a list.
  config.model.mixer = ml_collections.FieldReference("softmax", field_type=object)
  config.model.num_layers = 4
  config.model.d_model = 192
  config.model.num_heads = 3  # head_dim 64
  config.model.num_kv_heads = 0  # 0 = num_heads (MHA); fewer gives GQA
  config.model.head_dim = 0  # 0 = d_model // num_heads
  config.model.mlp_dim = 0  # 0 = SwiGLU width round(8/3 * d_model) to a multiple of 64
  config.model.mlp_activation = "swiglu"  # swiglu | geglu
  config.model.qk_norm = False  # RMSNorm on q and k per head (OLMo-2 / Gemma style)
  config.model.rope_theta = 10_000.0
  config.model.norm_eps = 1e-6
  config.model.tie_embeddings = True
  config.model.vocab_size = 259  # ByT5 byte ids: 0 pad, 1 eos, 2 unk, byte b -> b + 3
  config.model.vocab_pad_multiple = 128  # embedding rows padded (259 -> 384); padded logits are masked
  config.model.attention_impl = ""  # "" = best for the backend; "reference" | "xla" | "pallas" force one
  config.model.interpret = False  # run Pallas kernels in interpret mode (CPU testing)
  config.model.scan_layers = False  # nn.scan over identical layers (faster compile for deep models)
  config.model.remat = "none"  # none | full | dots_saveable  (activation checkpointing per layer)
  config.model.dtype = "float32"  # set from train.compute_dtype at run time

  config.data = ml_collections.ConfigDict()
  # bundled | files | single_file | jsonl | parquet | array_record (data/corpora.py) | mqar (data/synthetic.py)
  config.data.source = "bundled"
  config.data.paths = ()  # files / dirs / globs (shards) of the source; one file for single_file
  config.data.text_field = "text"  # the jsonl field / parquet column that holds a document's text
  config.data.split_paths = ml_collections.ConfigDict()  # the dataset's own split files (replace data.paths)
  config.data.split_paths.train = ()
  config.data.split_paths.valid = ()
  config.data.split_paths.test = ()
  config.data.cache_dir = ""  # byte-store cache; "" = $BYTELAB_DATA_CACHE or ~/.cache/bytelab/data
  config.data.shuffle = True
  config.data.segment_documents = True  # packed documents get segment ids (no cross-document attention)
  config.data.max_corpus_bytes = 0  # 0 = no cap; cap the train split (bytes) for quick experiments
  # Fraction of train windows that start with a passkey document (prompt + answer, up to seq_len bytes), so
  # that retrieval is learned at the training length (length-generalization experiments); 0 = none.
  config.data.passkey_fraction = 0.0
  # Span corruption (encoder-decoders, batch format "span_corruption"; data/span_corruption.py, T5 / ByT5
  # spec §2.4): train.seq_len is then the encoder input length and the target length follows from these.
  config.data.span_corruption = ml_collections.ConfigDict()
  config.data.span_corruption.noise_density = 0.15
  config.data.span_corruption.mean_noise_span_length = 20.0
  config.data.mqar = ml_collections.ConfigDict()  # data.source=mqar (configs/mqar.py)
  config.data.mqar.num_pairs = (4, 8, 16)  # key-value pairs per sequence, drawn uniformly per sequence
  config.data.mqar.eval_examples = 256  # sequences per eval split (valid / test) for bits per answer

  config.eval = ml_collections.ConfigDict()
  config.eval.split = "valid"  # valid | test
  config.eval.batch_size = 16
  config.eval.max_batches = 8  # periodic evals: batches spread over the split; 0 = the whole split
  config.eval.final_max_batches = 0  # the end-of-run eval (the final line); 0 = the whole split
  config.eval.compressor_max_bytes = 16 << 20  # gzip / xz on an even sample of this size of larger splits

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 950  # save every K steps (and always at the end and on SIGTERM/SIGINT)
  config.checkpoint.keep = 3  # keep the newest N checkpoints
  config.checkpoint.async_save = True

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # one of the three may be -1: filled with the remaining device count
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.logical_axis_rules = LOGICAL_AXIS_RULES

  config.generate = ml_collections.ConfigDict()
  config.generate.max_new_bytes = 128
  config.generate.temperature = 0.0  # 0 = greedy
  config.generate.top_k = 0  # 0 = no top-k filter
  config.generate.seed = 0

  # evaluate.py --tasks=passkey (spec 2.7): greedy answer to a passkey prompt of each length.
  config.passkey = ml_collections.ConfigDict()
  config.passkey.lengths = (1, 2, 4, 8, 16)  # prompt lengths in multiples of train.seq_len (bytes)
  config.passkey.trials = 20  # prompts per length
  config.passkey.max_new_bytes = 8  # greedy bytes generated; the answer is their first integer
  config.passkey.batch_size = 4  # prompts decoded together
  config.passkey.seed = 0

  # evaluate.py --tasks=mqar (Zoology MQAR): teacher-forced accuracy on the query values.
  config.mqar = ml_collections.ConfigDict()
  config.mqar.num_pairs = (4, 8, 16, 32)  # one table row per value
  config.mqar.seq_len = 0  # model input length; 0 = train.seq_len, raised to 4 * num_pairs - 1 if shorter
  config.mqar.num_examples = 256  # sequences per row
  config.mqar.batch_size = 32
  config.mqar.seed = 0

  # evaluate.py --tasks=copy: teacher-forced accuracy on bytes that only copying predicts (passkey digits,
  # a repeated random string); tells retrieval from a learned answer shape.
  config.copy = ml_collections.ConfigDict()
  config.copy.probes = ("passkey_repeat", "passkey_answer", "repeat_digits", "repeat_letters")  # table rows
  config.copy.num_examples = 64  # rows per probe, at train.seq_len
  config.copy.batch_size = 16
  config.copy.seed = 0

  return config
