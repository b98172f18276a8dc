"""A test task whose answers are one token each (the case where the harness model scores all of a
prompt's answers from one row): NusaX English sentiment with the labels as the letters a / b / c."""

from bloomtrain.harness.tasks.nusax import nusax


def dataset(**_: object):
    return nusax.sentiment("eng")
