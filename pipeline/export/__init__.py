"""Exports of the segment job's labels for annotation tools and training sets
(jobs/export_labels.py is the command):

    selection.py    which images, in which order: latest ok rows, filters, review queue
    shards.py       one shard: read and check its masks, encode, write; shards in turn or as Ray tasks
    driver.py       ExportConfig, the run, the manifest (written last), stale files removed
    labelstudio.py  Label Studio tasks JSON with brush RLE predictions
    cvat.py         CVAT "Segmentation mask 1.1" zips
    huggingface.py  Hugging Face Parquet with Image features, id2label.json
"""
