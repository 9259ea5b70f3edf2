"""The embedded world (docs/world.md; no external files): `world_<method>` for every method and
`world_span_corruption`, T5's span-corruption pretraining over the world's encyclopedia corpus,
`world_facts`, single-fact questions about every entity, and `world_pretraining`, the two mixed;
`world_reading`, the labelled tasks' questions with their facts given, about made-up animals, and
`world_pretraining_reading`, all three mixed; `world_traits_<method>`, one-fact yes/no trait
questions (the world's easier tier).

Generated deterministically by distill_sbs.data.world: train 400 problems over 40 "seen"
animals (world_traits: over 120), test 1,200 (600 over seen animals, 600 over animals only the
corpus describes), two teachers "alpha" and "beta" about 12% wrong; vocabulary
distill_sbs.data.world.vocabulary() (709 ids with 100 sentinels). Suggested
task_feature_lengths: {"inputs": 64, "targets": 64} for the tasks ({"inputs": 32, "targets": 32}
for world_traits), {"inputs": 128, "targets": 48} for pretraining (gin/world/pretrain.gin).
The shipped pretrained student is the gin constant WORLD_STUDENT.
"""

import functools

import gin
import seqio

from distill_sbs.data import register_dataset, world
from distill_sbs.data.pretraining import register_span_corruption_task, register_text_pairs_task

# The labelled tasks: `world_<method>` (count, compare, two-hop) and `world_traits_<method>`, the
# one-fact tier (docs/world.md "The trait questions").
NAMES = [
    name
    for dataset in world.DATASETS
    for name in register_dataset(
        dataset,
        loader=functools.partial(world.generate, dataset=dataset),
        splits=tuple(world.SIZES),
        metric="accuracy",
        vocabulary=world.vocabulary(),
        teachers=world.TEACHERS,
    )
]
PRETRAINING = register_span_corruption_task(
    "world_span_corruption",
    vocabulary=world.vocabulary(),
    documents=world.corpus_split,
    splits=("train", "validation"),
)
FACTS = register_text_pairs_task(
    "world_facts",
    vocabulary=world.vocabulary(),
    pairs=world.fact_questions,
    splits=("train", "validation"),
)
# The pretraining mixture (docs/world.md "Third design"): span corruption of the corpus beside the
# single-fact questions, mixed at equal rates (4,800 documents, 3,846 questions).
seqio.MixtureRegistry.remove("world_pretraining")
seqio.MixtureRegistry.add("world_pretraining", [(PRETRAINING, 1.0), (FACTS, 1.0)])
PRETRAINING_MIXTURE = "world_pretraining"
READING = register_text_pairs_task(
    "world_reading",
    vocabulary=world.vocabulary(),
    pairs=world.reading_questions,
    splits=("train", "validation"),
)
# The fourth design (docs/world.md): the same, with reading questions (the labelled tasks'
# reasoning over facts given in the input, about made-up animals) at an equal rate.
seqio.MixtureRegistry.remove("world_pretraining_reading")
seqio.MixtureRegistry.add(
    "world_pretraining_reading", [(PRETRAINING, 1.0), (FACTS, 1.0), (READING, 1.0)]
)

# The shipped pretrained student (docs/world.md "Fifth design"), a Hugging Face folder;
# gin files start from it with INITIAL_CHECKPOINT_PATH = %WORLD_STUDENT.
gin.constant("WORLD_STUDENT", world.PRETRAINED_STUDENT)
