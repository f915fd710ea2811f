"""The training step: the loss, the optimizer and one jitted, sharded update of the student.

The teacher is an argument of the step that is never donated; the student's params and optimizer state are
donated every step. Both models see the same x_t, t and text (``train.flow``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from . import flow
from .configs import Config


def make_optimizer(config: Config) -> tuple[optax.GradientTransformation, Callable[[int], Any]]:
  """AdamW with a linear warm-up to ``config.learning_rate`` and optional global-norm clipping; and its schedule."""
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
      optax.constant_schedule(config.learning_rate),
    ],
    [config.warmup_steps],
  )
  adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule
  return adamw, schedule


def make_loss_fn(config: Config, teacher_graphdef: nnx.GraphDef, student_graphdef: nnx.GraphDef):
  """loss(student_params, teacher_params, batch, key) -> (loss, sparsity [layers]).

  batch: {"latents": [batch, frames, height, width, channels], "context": [batch, text_len, text_dim]}.
  """
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32

  def loss_fn(params, teacher_params, batch, key):
    x0, context = batch["latents"], batch["context"]
    chex.assert_rank([x0, context], [5, 3])
    t_key, noise_key = jax.random.split(key)
    t = flow.sample_t(t_key, x0.shape[:1], mean=config.time.mean, std=config.time.std, shift=config.time.shift)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    x_t = flow.noisy(x0, noise, t).astype(dtype)
    timestep, context = flow.model_timestep(t), context.astype(dtype)
    if config.loss == "distill":
      teacher = nnx.merge(teacher_graphdef, teacher_params)
      target = jax.lax.stop_gradient(teacher(x_t, timestep, context))
    else:
      target = flow.velocity(x0, noise)
    student = nnx.merge(student_graphdef, params)
    prediction, sparsity = student(x_t, timestep, context, return_sparsity=True)
    chex.assert_equal_shape([prediction, target])
    loss = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))
    return loss, sparsity.mean(axis=(1, 2))

  return loss_fn


def make_train_step(loss_fn, optimizer, param_shardings, opt_shardings, teacher_shardings, batch_sharding, replicated):
  """One jitted update; student params and optimizer state are donated, the teacher never is.

  step(params, opt_state, teacher_params, batch, key, step) -> (params, opt_state, metrics)
  """

  def step(params, opt_state, teacher_params, batch, key, step_index):
    key = jax.random.fold_in(key, step_index)
    (loss, sparsity), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, teacher_params, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "sparsity": sparsity}
    return params, opt_state, metrics

  batch_shardings = {"latents": batch_sharding, "context": batch_sharding}
  return jax.jit(
    step,
    in_shardings=(param_shardings, opt_shardings, teacher_shardings, batch_shardings, replicated, replicated),
    out_shardings=(param_shardings, opt_shardings, replicated),
    donate_argnums=(0, 1),
  )
