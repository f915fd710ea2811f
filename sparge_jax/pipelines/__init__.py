"""Text-to-video pipelines: Wan2.1 (`wan.WanPipeline`), sparse-attention schedules, video files."""

from sparge_jax.pipelines.schedule import AttentionSchedule, LayerSparsity
from sparge_jax.pipelines.video import export_video

__all__ = ["AttentionSchedule", "LayerSparsity", "export_video"]
