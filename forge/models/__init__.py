"""forge/models"""
