"""The embedded world (docs/world.md; no external files): `world_<method>` for every method and
`world_span_corruption`, T5's span-corruption pretraining over the world's encyclopedia corpus.

Generated deterministically by distill_sbs.data.world: train 400 problems over 40 "seen"
animals, test 1,200 (600 over seen animals, 600 over animals only the corpus describes), two
teachers "alpha" and "beta" about 12% wrong; vocabulary distill_sbs.data.world.vocabulary()
(1,124 ids with 100 sentinels). Suggested task_feature_lengths: {"inputs": 64, "targets": 64}
for the tasks, {"inputs": 128, "targets": 32} for pretraining (gin/world/pretrain.gin).
"""

from distill_sbs.data import register_dataset, world
from distill_sbs.data.pretraining import register_span_corruption_task

NAMES = register_dataset(
    "world",
    loader=world.generate,
    splits=tuple(world.SIZES),
    metric="accuracy",
    vocabulary=world.vocabulary(),
    teachers=world.TEACHERS,
)
PRETRAINING = register_span_corruption_task(
    "world_span_corruption",
    vocabulary=world.vocabulary(),
    documents=world.corpus_split,
    splits=("train", "validation"),
)
