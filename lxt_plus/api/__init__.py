"""The user API: explaining texts, images and generations, captures, datasets, string targets and
pipelines, on top of :mod:`lxt_plus.engine`."""
