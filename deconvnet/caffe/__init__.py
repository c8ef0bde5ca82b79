"""The authors' Caffe weights: the .caffemodel wire format (`proto`) and their
conversion to model directories (`convert`)."""
