"""The demo's pipeline job: the schema's recipe, with pretraining, unless the user overrides."""

from __future__ import annotations

from launch.demo import DEMO_STEPS, demo_params
from textcls.jobs import PipelineParams


def test_demo_leaves_the_recipe_to_the_job_schema() -> None:
    params = demo_params(3, 4)
    for key in ("base_model", "epochs", "max_length", "batch_size", "vocab", "init_embeddings"):
        assert key not in params
    job = PipelineParams.model_validate(params)
    defaults = PipelineParams.model_validate({"dataset_id": 3, "eval_dataset_id": 4})
    assert (job.epochs, job.max_length, job.vocab) == (
        defaults.epochs,
        defaults.max_length,
        defaults.vocab,
    )
    assert job.steps == DEMO_STEPS and job.steps[0] == "pretrain"
    assert job.pretrain_epochs == 1 and job.promote and job.baseline


def test_demo_passes_what_the_user_sets() -> None:
    params = demo_params(3, 4, preset="small", epochs=1, max_length=32, pretrain_epochs=2)
    job = PipelineParams.model_validate(params)
    assert (job.base_model, job.epochs, job.max_length) == ("scratch:small", 1, 32)
    assert (
        job.pretrain_epochs == 2
        and job.batch_size == PipelineParams.model_fields["batch_size"].default
    )
