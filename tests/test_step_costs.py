"""What the compiled steps cost: each kind what the standalone model of its size costs.

The base step slices, it never masks: its XLA FLOP count is the standalone base
model's step (within 5%) and well below the motivated step's.
"""

import re

import jax
import optax
import pytest

from motivation_jax import nesting, steps
from motivation_jax.models import NestedEfficientNet, NestedResNet

from conftest import DEFAULT_COMPILER, MODELS, check_step_flops, make_batch, reference_step


# One model of every family, and every kind of nesting among them: (model, the
# most the base step may cost as a fraction of the motivated step).
FLOPS_CASES = {
    "mlp, wider and deeper": (MODELS["mlp"], 0.6),
    # Deeper only: the stem and the first blocks, which both share, cost most at
    # 16x16, so the base costs more than half.
    "resnet (imagenet stem), deeper": (lambda: NestedResNet(
        base_widths=(4, 8), base_depths=(1, 1), motivated_widths=(4, 8),
        motivated_depths=(3, 3), num_classes=10, stem="imagenet"), 0.8),
    "efficientnet, wider": (lambda: NestedEfficientNet(
        base_stem=4, base_widths=(4, 8), base_depths=(1, 1), base_head=8,
        motivated_stem=8, motivated_widths=(8, 12), motivated_depths=(1, 1), motivated_head=16,
        num_classes=10, blocks=((1, 3, 1), (4, 3, 2))), 0.6),
    "vit, wider and deeper": (MODELS["vit"], 0.6),
}


@pytest.mark.parametrize("case", sorted(FLOPS_CASES))
def test_compiled_flops_match_the_standalone_models(case):
  model, max_base_fraction = FLOPS_CASES[case]
  # 16x16 images: the ImageNet stem leaves 4x4 positions for the stages.
  check_step_flops(model(), make_batch(n=128, hw=16, channels=3),
                   max_base_fraction=max_base_fraction)


def _copies(compiled) -> int:
  entry = compiled.as_text().split("\nENTRY", 1)[1]
  return len(re.findall(r"= \S+ copy\(", entry))


@pytest.fixture(scope="module")
def mlp_base_steps():
  """The conftest MLP's base step with AdamW and its standalone base's step, both
  compiled as the default flags compile them (the program users run), and the
  base's variables."""
  model, optimizer, batch = MODELS["mlp"](), optax.adamw(1e-2, weight_decay=0.1), make_batch()
  state = steps.create_train_state(model, optimizer, jax.random.key(0), batch["image"])
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  base = steps.make_train_steps(model, optimizer, wmap=wmap)["base"].lower(
      state, batch).compile(DEFAULT_COMPILER)
  variables = nesting.export(state.variables("base"), "base", wmap)
  variables.setdefault("batch_stats", {})
  standalone = jax.jit(
      lambda v, o, b: reference_step(model.standalone("base"), optimizer, v, o, b),
      donate_argnums=(0, 1)).lower(variables, optimizer.init(variables["params"]), batch).compile(
          DEFAULT_COMPILER)
  return base, standalone, variables


def test_the_base_step_writes_its_region_back_in_place_without_copying_the_moments(
    mlp_base_steps):
  """The moments' write-back waits for the update that reads them
  (``nesting.write_after``); unordered, XLA copies every moment of a partly-base
  leaf first (measured: 21 copies in this MLP's base step, 3 in its standalone base
  step, 1 in order; for the ViT of conftest 107, 15 and 11)."""
  base, standalone, _ = mlp_base_steps
  assert _copies(base) <= _copies(standalone), (_copies(base), _copies(standalone))


def test_the_base_step_computes_the_moments_it_writes_in_place_without_copying_them(
    mlp_base_steps):
  """The moments' new values are computed from the moments read at the index
  they are written at (``steps.base_train_step``), so XLA updates them in
  place; from a static slice it copied every moment's base region out first:
  the base step then needed the base's parameter bytes twice more in
  temporaries than its standalone step (AdamW: mu and nu). What stays above
  the standalone step is at most the base's parameters once (the kernels the
  dots read, copied out of the larger ones)."""
  base, standalone, variables = mlp_base_steps
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(variables["params"]))
  temp = {name: c.memory_analysis().temp_size_in_bytes
          for name, c in (("base", base), ("standalone", standalone))}
  assert temp["base"] <= temp["standalone"] + base_bytes, (temp, base_bytes)


def test_the_motivated_step_applies_its_finite_update_in_place_without_copying_the_moments():
  """The optimizer state's selects wait for the parameter update that reads the
  old state (``steps.keep_finite_update``); unordered, XLA copies every moment
  and the count first (measured here: 17 copies unordered against the
  standalone step's 4)."""
  model, optimizer, batch = MODELS["mlp"](), optax.adamw(1e-2, weight_decay=0.1), make_batch()
  state = steps.create_train_state(model, optimizer, jax.random.key(0), batch["image"])
  wmap = nesting.weights_map(model, batch["image"], subnet="motivated")
  motivated = steps.make_train_steps(model, optimizer, wmap=wmap)["motivated"].lower(
      state, batch).compile(DEFAULT_COMPILER)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  standalone = jax.jit(
      lambda v, o, b: reference_step(model.standalone("motivated"), optimizer, v, o, b),
      donate_argnums=(0, 1)).lower(variables, state.opt_state, batch).compile(DEFAULT_COMPILER)
  assert _copies(motivated) <= _copies(standalone), (_copies(motivated), _copies(standalone))
