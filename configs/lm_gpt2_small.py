r"""GPT-2 small's size on lm1b: a nested decoder-only transformer for GPUs and TPUs.

The motivated model has GPT-2 small's shape: 12 layers, 12 heads of 64, width
768, FFN 3072, context 1024, learned positions, tied embeddings, a byte-level
BPE of 50,257 symbols trained on the training split (124,337,664
parameters); the base keeps the width and the 12 blocks with 6 heads and a
quarter of the FFN (67,714,560, 38.6M of them the embedding). bfloat16
compute (float32 parameters, optimizer state and loss), the parameters and
optimizer state split over 8 devices (``mesh.fsdp``; set it to a host's
devices), AdamW beta2 0.95, weight decay 0.1, gradients clipped to norm 1
(nanoGPT's GPT-2 recipe).

Data: lm1b prepared as a TFDS ``array_record`` set where there is network
(``tfds build lm1b --file_format=array_record``), ``--config.data_dir`` pointing
at it; ``max_examples`` bounds what is read into memory (the whole of lm1b's
train split is 4 GB of text; a streaming reader is not written yet).

Command:

  python -m motivation_jax.main --config=configs/lm_gpt2_small.py --workdir=DIR --config.data_dir=TFDS_DIR --config.mesh.fsdp=8

Expected result: not measured yet (no accelerator run). ``:smoke`` (a tiny
pair on TFDS mock data, bfloat16, FSDP over the devices there are) trains on a
CPU in tests/test_configs.py.
"""

from motivation_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.lm_defaults(config_lib.default_config(__file__))
  config.dataset = "lm1b"
  config.max_examples = 2_000_000    # sentences read per split (about 250 MB of text)
  config.tokenizer = "bpe:50257"     # GPT-2's vocabulary size, trained on the training split
  config.model.seq_len = 1024
  config.model.d_model = 768         # shared: d_model does not nest
  config.model.head_dim = 64
  config.model.positions = "learned"
  config.model.base = {"num_heads": 6, "ffn_dim": 768, "num_layers": 12}
  config.model.motivated = {"num_heads": 12, "ffn_dim": 3072, "num_layers": 12}
  config.dtype = "bfloat16"
  config.mesh.fsdp = 8
  config.mesh.fsdp_min_mib = 1.0
  config.batch_size = 256
  config.eval_batch_size = 64
  config.learning_rate = 6e-4
  config.final_learning_rate = 6e-5
  config.warmup_steps = 2000
  config.adam_b2 = 0.95
  config.num_train_steps = 100_000
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 1000
  config.max_eval_tokens = 2_000_000

  def smoke(config):
    config_lib.make_lm_smoke(config)
    config.tokenizer = "bpe:300"
    config.model.positions = "learned"
    config.mesh.fsdp = 2  # FSDP on the CPU devices a test has
    config.mesh.fsdp_min_mib = 0.0
    config.max_examples = None
  return config_lib.variant(config, arg, smoke=smoke)
