"""mtl_med.engines"""
