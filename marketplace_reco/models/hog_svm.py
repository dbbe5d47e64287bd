"""HOG features + linear SVM image baseline."""
