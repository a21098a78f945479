


def forward(self, x, t, y):
    x_embedder_proj = self.x_embedder.proj(x);  x = None
    flatten = x_embedder_proj.flatten(2);  x_embedder_proj = None
    transpose = flatten.transpose(1, 2);  flatten = None
    pos_embed = self.pos_embed
    add = transpose + pos_embed;  transpose = pos_embed = None
    getattr_1 = t.device
    arange = torch.arange(128, dtype = torch.float32, device = getattr_1);  getattr_1 = None
    mul = -9.210340371976184 * arange;  arange = None
    truediv = mul / 128;  mul = None
    exp = torch.exp(truediv);  truediv = None
    getitem = t[(slice(None, None, None), None)];  t = None
    float_1 = getitem.float();  getitem = None
    getitem_1 = exp[None];  exp = None
    mul_1 = float_1 * getitem_1;  float_1 = getitem_1 = None
    cos = torch.cos(mul_1)
    sin = torch.sin(mul_1);  mul_1 = None
    cat = torch.cat([cos, sin], dim = -1);  cos = sin = None
    t_embedder_mlp_0 = getattr(self.t_embedder.mlp, "0")(cat);  cat = None
    t_embedder_mlp_1 = getattr(self.t_embedder.mlp, "1")(t_embedder_mlp_0);  t_embedder_mlp_0 = None
    t_embedder_mlp_2 = getattr(self.t_embedder.mlp, "2")(t_embedder_mlp_1);  t_embedder_mlp_1 = None
    y_embedder_embedding_table = self.y_embedder.embedding_table(y);  y = None
    add_1 = t_embedder_mlp_2 + y_embedder_embedding_table;  t_embedder_mlp_2 = y_embedder_embedding_table = None
    blocks_0_ada_ln_modulation_0 = getattr(getattr(self.blocks, "0").adaLN_modulation, "0")(add_1)
    blocks_0_ada_ln_modulation_1 = getattr(getattr(self.blocks, "0").adaLN_modulation, "1")(blocks_0_ada_ln_modulation_0);  blocks_0_ada_ln_modulation_0 = None
    chunk = blocks_0_ada_ln_modulation_1.chunk(6, dim = 1);  blocks_0_ada_ln_modulation_1 = None
    getitem_2 = chunk[0]
    getitem_3 = chunk[1]
    getitem_4 = chunk[2]
    getitem_5 = chunk[3]
    getitem_6 = chunk[4]
    getitem_7 = chunk[5];  chunk = None
    unsqueeze = getitem_4.unsqueeze(1);  getitem_4 = None
    blocks_0_norm1 = getattr(self.blocks, "0").norm1(add)
    unsqueeze_1 = getitem_3.unsqueeze(1);  getitem_3 = None
    add_2 = 1 + unsqueeze_1;  unsqueeze_1 = None
    mul_2 = blocks_0_norm1 * add_2;  blocks_0_norm1 = add_2 = None
    unsqueeze_2 = getitem_2.unsqueeze(1);  getitem_2 = None
    add_3 = mul_2 + unsqueeze_2;  mul_2 = unsqueeze_2 = None
    blocks_0_attn = getattr(self.blocks, "0").attn(add_3);  add_3 = None
    mul_3 = unsqueeze * blocks_0_attn;  unsqueeze = blocks_0_attn = None
    add_4 = add + mul_3;  add = mul_3 = None
    unsqueeze_3 = getitem_7.unsqueeze(1);  getitem_7 = None
    blocks_0_norm2 = getattr(self.blocks, "0").norm2(add_4)
    unsqueeze_4 = getitem_6.unsqueeze(1);  getitem_6 = None
    add_5 = 1 + unsqueeze_4;  unsqueeze_4 = None
    mul_4 = blocks_0_norm2 * add_5;  blocks_0_norm2 = add_5 = None
    unsqueeze_5 = getitem_5.unsqueeze(1);  getitem_5 = None
    add_6 = mul_4 + unsqueeze_5;  mul_4 = unsqueeze_5 = None
    flatten_1 = add_6.flatten(0, -2)
    blocks_0_moe_ep_router = getattr(self.blocks, "0").moe.ep_router(flatten_1)
    getitem_18 = blocks_0_moe_ep_router[0]
    getitem_19 = blocks_0_moe_ep_router[1];  blocks_0_moe_ep_router = None
    permute = moedit_runtime_expert_ops_permute(flatten_1, getitem_18, 2, 4);  getitem_18 = None
    getitem_20 = permute[0]
    getitem_21 = permute[1]
    getitem_22 = permute[2];  permute = None
    blocks_0_moe_ep_counts = getattr(self.blocks, "0").moe.ep_counts(getitem_22)
    splits = moedit_runtime_expert_ops_splits(getitem_22);  getitem_22 = None
    splits_1 = moedit_runtime_expert_ops_splits(blocks_0_moe_ep_counts)
    blocks_0_moe_ep_dispatch = getattr(self.blocks, "0").moe.ep_dispatch(getitem_20, splits, splits_1);  getitem_20 = None
    blocks_0_moe_shared_experts = getattr(self.blocks, "0").moe.shared_experts(flatten_1);  flatten_1 = None
    wait = moedit_runtime_comm_wait(blocks_0_moe_ep_dispatch);  blocks_0_moe_ep_dispatch = None
    blocks_0_moe_ep_experts = getattr(self.blocks, "0").moe.ep_experts(wait, blocks_0_moe_ep_counts);  wait = blocks_0_moe_ep_counts = None
    blocks_0_moe_ep_combine = getattr(self.blocks, "0").moe.ep_combine(blocks_0_moe_ep_experts, splits_1, splits);  blocks_0_moe_ep_experts = splits_1 = splits = None
    wait_1 = moedit_runtime_comm_wait(blocks_0_moe_ep_combine);  blocks_0_moe_ep_combine = None
    unpermute = moedit_runtime_expert_ops_unpermute(wait_1, getitem_21, getitem_19);  wait_1 = getitem_21 = getitem_19 = None
    blocks_0_moe_ep_merge = getattr(self.blocks, "0").moe.ep_merge(unpermute, blocks_0_moe_shared_experts);  unpermute = blocks_0_moe_shared_experts = None
    reshape_as = blocks_0_moe_ep_merge.reshape_as(add_6);  blocks_0_moe_ep_merge = add_6 = None
    mul_5 = unsqueeze_3 * reshape_as;  unsqueeze_3 = reshape_as = None
    add_7 = add_4 + mul_5;  add_4 = mul_5 = None
    blocks_1_ada_ln_modulation_0 = getattr(getattr(self.blocks, "1").adaLN_modulation, "0")(add_1)
    blocks_1_ada_ln_modulation_1 = getattr(getattr(self.blocks, "1").adaLN_modulation, "1")(blocks_1_ada_ln_modulation_0);  blocks_1_ada_ln_modulation_0 = None
    chunk_1 = blocks_1_ada_ln_modulation_1.chunk(6, dim = 1);  blocks_1_ada_ln_modulation_1 = None
    getitem_8 = chunk_1[0]
    getitem_9 = chunk_1[1]
    getitem_10 = chunk_1[2]
    getitem_11 = chunk_1[3]
    getitem_12 = chunk_1[4]
    getitem_13 = chunk_1[5];  chunk_1 = None
    unsqueeze_6 = getitem_10.unsqueeze(1);  getitem_10 = None
    blocks_1_norm1 = getattr(self.blocks, "1").norm1(add_7)
    unsqueeze_7 = getitem_9.unsqueeze(1);  getitem_9 = None
    add_8 = 1 + unsqueeze_7;  unsqueeze_7 = None
    mul_6 = blocks_1_norm1 * add_8;  blocks_1_norm1 = add_8 = None
    unsqueeze_8 = getitem_8.unsqueeze(1);  getitem_8 = None
    add_9 = mul_6 + unsqueeze_8;  mul_6 = unsqueeze_8 = None
    blocks_1_attn = getattr(self.blocks, "1").attn(add_9);  add_9 = None
    mul_7 = unsqueeze_6 * blocks_1_attn;  unsqueeze_6 = blocks_1_attn = None
    add_10 = add_7 + mul_7;  add_7 = mul_7 = None
    unsqueeze_9 = getitem_13.unsqueeze(1);  getitem_13 = None
    blocks_1_norm2 = getattr(self.blocks, "1").norm2(add_10)
    unsqueeze_10 = getitem_12.unsqueeze(1);  getitem_12 = None
    add_11 = 1 + unsqueeze_10;  unsqueeze_10 = None
    mul_8 = blocks_1_norm2 * add_11;  blocks_1_norm2 = add_11 = None
    unsqueeze_11 = getitem_11.unsqueeze(1);  getitem_11 = None
    add_12 = mul_8 + unsqueeze_11;  mul_8 = unsqueeze_11 = None
    flatten_2 = add_12.flatten(0, -2)
    blocks_1_moe_ep_router = getattr(self.blocks, "1").moe.ep_router(flatten_2)
    getitem_23 = blocks_1_moe_ep_router[0]
    getitem_24 = blocks_1_moe_ep_router[1];  blocks_1_moe_ep_router = None
    permute_1 = moedit_runtime_expert_ops_permute(flatten_2, getitem_23, 2, 4);  getitem_23 = None
    getitem_25 = permute_1[0]
    getitem_26 = permute_1[1]
    getitem_27 = permute_1[2];  permute_1 = None
    blocks_1_moe_ep_counts = getattr(self.blocks, "1").moe.ep_counts(getitem_27)
    splits_2 = moedit_runtime_expert_ops_splits(getitem_27);  getitem_27 = None
    splits_3 = moedit_runtime_expert_ops_splits(blocks_1_moe_ep_counts)
    blocks_1_moe_ep_dispatch = getattr(self.blocks, "1").moe.ep_dispatch(getitem_25, splits_2, splits_3);  getitem_25 = None
    blocks_1_moe_shared_experts = getattr(self.blocks, "1").moe.shared_experts(flatten_2);  flatten_2 = None
    wait_2 = moedit_runtime_comm_wait(blocks_1_moe_ep_dispatch);  blocks_1_moe_ep_dispatch = None
    blocks_1_moe_ep_experts = getattr(self.blocks, "1").moe.ep_experts(wait_2, blocks_1_moe_ep_counts);  wait_2 = blocks_1_moe_ep_counts = None
    blocks_1_moe_ep_combine = getattr(self.blocks, "1").moe.ep_combine(blocks_1_moe_ep_experts, splits_3, splits_2);  blocks_1_moe_ep_experts = splits_3 = splits_2 = None
    wait_3 = moedit_runtime_comm_wait(blocks_1_moe_ep_combine);  blocks_1_moe_ep_combine = None
    unpermute_1 = moedit_runtime_expert_ops_unpermute(wait_3, getitem_26, getitem_24);  wait_3 = getitem_26 = getitem_24 = None
    blocks_1_moe_ep_merge = getattr(self.blocks, "1").moe.ep_merge(unpermute_1, blocks_1_moe_shared_experts);  unpermute_1 = blocks_1_moe_shared_experts = None
    reshape_as_1 = blocks_1_moe_ep_merge.reshape_as(add_12);  blocks_1_moe_ep_merge = add_12 = None
    mul_9 = unsqueeze_9 * reshape_as_1;  unsqueeze_9 = reshape_as_1 = None
    add_13 = add_10 + mul_9;  add_10 = mul_9 = None
    final_layer_ada_ln_modulation_0 = getattr(self.final_layer.adaLN_modulation, "0")(add_1);  add_1 = None
    final_layer_ada_ln_modulation_1 = getattr(self.final_layer.adaLN_modulation, "1")(final_layer_ada_ln_modulation_0);  final_layer_ada_ln_modulation_0 = None
    chunk_2 = final_layer_ada_ln_modulation_1.chunk(2, dim = 1);  final_layer_ada_ln_modulation_1 = None
    getitem_14 = chunk_2[0]
    getitem_15 = chunk_2[1];  chunk_2 = None
    final_layer_norm_final = self.final_layer.norm_final(add_13);  add_13 = None
    unsqueeze_12 = getitem_15.unsqueeze(1);  getitem_15 = None
    add_14 = 1 + unsqueeze_12;  unsqueeze_12 = None
    mul_10 = final_layer_norm_final * add_14;  final_layer_norm_final = add_14 = None
    unsqueeze_13 = getitem_14.unsqueeze(1);  getitem_14 = None
    add_15 = mul_10 + unsqueeze_13;  mul_10 = unsqueeze_13 = None
    final_layer_linear = self.final_layer.linear(add_15);  add_15 = None
    getattr_2 = final_layer_linear.shape
    getitem_16 = getattr_2[0];  getattr_2 = None
    reshape = final_layer_linear.reshape(getitem_16, 4, 4, 2, 2, 8);  final_layer_linear = getitem_16 = None
    einsum = torch.functional.einsum('nhwpqc->nchpwq', reshape)
    getattr_3 = reshape.shape;  reshape = None
    getitem_17 = getattr_3[0];  getattr_3 = None
    reshape_1 = einsum.reshape(getitem_17, 8, 8, 8);  einsum = getitem_17 = None
    return reshape_1
    