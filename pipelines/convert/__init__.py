"""Convert an ImageFolder-layout ImageNet into FFCV (.beton) and DALI webdataset shards.

The CLI is tools/convert_in1k.py; docs/CONVERT.md describes the outputs. Modules, one job each:
options (validated settings), sources (which files, which labels), images (decode, repair,
resize, re-encode one file), work (resumable parallel encode into chunk files), beton and
shards (the two writers), report (meta.json and the printed summary), verify (re-read outputs),
convert (the phases in order). Nothing here imports ffcv or DALI at module import.
"""
