"""Distillation: a teacher's knowledge into a smaller student, as a method of the training loop
(slimlm.distill.method), students built from the teacher (slimlm.distill.students); the losses are pure
functions in slimlm.core.distill."""
