"""What the commands share: one-line user errors (:mod:`.errors`), the range of every numeric
flag (:mod:`.flags`), progress on stderr (:mod:`.progress`) and the model and map flags with
model loading (:mod:`.args`). Internal plumbing: nothing here is imported eagerly, so that
``errors`` can sit below the models and ``args`` above them without an import cycle."""
