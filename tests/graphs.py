"""Small IR programs shared by tests (parsed with `fusec.printer.parse_graph`)."""

# exp, a softmax over rows, tanh and a max over columns: elementwise, reduction and broadcast kernels
SOFTMAX_TANH = """
%0 = input {index=0, name="x"} : f32[4,8]
%1 = exp %0 : f32[4,8]
%2 = sum %1 {axes=[1], keepdim=true} : f32[4,1]
%3 = div %1, %2 : f32[4,8]
%4 = tanh %3 : f32[4,8]
%5 = amax %4 {axes=[0], keepdim=false} : f32[8]
return %4, %5
"""

# the same with a matmul after it: kernels of several kinds, one of them a BLAS call
SOFTMAX_TANH_MATMUL = SOFTMAX_TANH.replace("return %4, %5\n", """%6 = input {index=1, name="w"} : f32[8,4]
%7 = matmul %4, %6 : f32[4,4]
%8 = sigmoid %7 : f32[4,4]
return %5, %8
""")
